//! Generation for one sequence as a small state machine the caller steps: the CLI runs one,
//! the server's engine steps many in one batch. The sequence owns its KV cache, sampler,
//! incremental detokenizer and stop-string matcher; the model call itself is the caller's, so
//! sequences of different lengths share one batched forward.

use crate::model::decoder::{Model, SeqInput};
use crate::model::kv_cache::KvCache;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::text::stop::StopStrings;
use crate::text::tokenizer::{StreamDecoder, TextTokenizer};
use anyhow::Result;

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings; the returned text excludes them.
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the tokenizer's end-of-turn tokens.
    pub stop_token_ids: Vec<u32>,
    /// Report each token's logprob with this many alternatives (None: no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn token or a stop string.
    Stop,
    /// max_tokens or the context length.
    Length,
}

/// A token with its logprob, as OpenAI reports it.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What one step produced for a sequence.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub token: u32,
    /// Text released by this step (may be empty while a stop string or a UTF-8 character is
    /// still incomplete).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

pub struct Sequence {
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub cache: KvCache,
    params: GenerationParams,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopStrings,
    /// Tokens not yet fed to the model: the prompt, then each sampled token.
    pending: Vec<u32>,
    /// How many of `pending` the current step feeds.
    feeding: usize,
    max_positions: usize,
    pub finish: Option<FinishReason>,
}

impl Sequence {
    pub fn new(model: &Model, prompt: Vec<u32>, params: GenerationParams) -> Self {
        let mut sampler = Sampler::new(&params.sampling);
        // The repetition penalty counts the prompt too, as HF and vLLM do.
        sampler.set_prompt(&prompt);
        Self {
            pending: prompt.clone(),
            feeding: 0,
            prompt,
            generated: Vec::new(),
            cache: KvCache::new(&model.config),
            sampler,
            decoder: StreamDecoder::new(),
            stops: StopStrings::new(params.stop.clone()),
            max_positions: model.rope.max_positions(),
            params,
            finish: None,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The model input for the next step, paired with this sequence's cache: the pending
    /// tokens, at most `max_tokens` of them, so a long prompt is fed over several steps while
    /// other sequences keep decoding.
    pub fn input(&mut self, max_tokens: usize) -> SeqInput<'_> {
        self.feeding = self.pending.len().min(max_tokens.max(1));
        SeqInput {
            tokens: &self.pending[..self.feeding],
            cache: &mut self.cache,
        }
    }

    /// After a step over [`Sequence::input`]: drops what it fed and says whether the step's
    /// logits are this sequence's next-token distribution (its whole prompt is cached), to be
    /// passed to [`Sequence::accept`].
    pub fn step_done(&mut self) -> bool {
        self.pending.drain(..self.feeding);
        self.feeding = 0;
        self.pending.is_empty()
    }

    /// Samples the next token from the logits after this sequence's last input token.
    pub fn accept(&mut self, logits: &[f32], tokenizer: &TextTokenizer) -> Result<StepOutput> {
        // Output layers may be padded past the vocabulary (Qwen2); those ids decode to nothing.
        let logits = &logits[..logits.len().min(tokenizer.vocab_size())];
        let sampled =
            self.sampler
                .sample(logits, &self.generated, self.params.logprobs.unwrap_or(0))?;
        let token = sampled.id;
        self.generated.push(token);
        self.pending = vec![token];
        let logprob = self.params.logprobs.map(|_| TokenLogprob {
            token: tokenizer.token_text(token).unwrap_or_default(),
            bytes: tokenizer.token_bytes(token),
            logprob: sampled.logprob,
            top: sampled
                .top
                .iter()
                .map(|&(id, lp)| {
                    (
                        tokenizer.token_text(id).unwrap_or_default(),
                        tokenizer.token_bytes(id),
                        lp,
                    )
                })
                .collect(),
        });

        let is_eos =
            tokenizer.eos_ids.contains(&token) || self.params.stop_token_ids.contains(&token);
        let mut text = String::new();
        let mut finish = None;
        let mut stopped_by_string = false;
        if is_eos {
            finish = Some(FinishReason::Stop);
        } else {
            let piece = self.decoder.push(tokenizer, token)?;
            let outcome = self.stops.push(&piece);
            text.push_str(&outcome.text);
            if outcome.stopped {
                finish = Some(FinishReason::Stop);
                stopped_by_string = true;
            }
        }
        if finish.is_none()
            && (self.generated.len() >= self.params.max_tokens
                || self.prompt.len() + self.generated.len() >= self.max_positions)
        {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && !stopped_by_string {
            // Release what was held back for a possible stop string or a split character.
            let tail = self.decoder.flush(tokenizer)?;
            text.push_str(&self.stops.push(&tail).text);
            text.push_str(&self.stops.finish());
        }
        self.finish = finish;
        Ok(StepOutput {
            token,
            text,
            logprob,
            finish,
        })
    }
}

/// Steps `seqs` together until all finish, calling `on_step(index, output)` for each token.
/// Every step is one batched forward over the unfinished sequences.
pub fn run_to_completion(
    model: &Model,
    tokenizer: &TextTokenizer,
    seqs: &mut [Sequence],
    mut on_step: impl FnMut(usize, &StepOutput),
) -> Result<()> {
    loop {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].is_finished())
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        let logits = {
            let mut inputs: Vec<SeqInput<'_>> = seqs
                .iter_mut()
                .filter(|s| !s.is_finished())
                .map(|s| s.input(usize::MAX))
                .collect();
            model.forward_step(&mut inputs)?
        };
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for (row, &i) in rows.iter().zip(&active) {
            if seqs[i].step_done() {
                let out = seqs[i].accept(row, tokenizer)?;
                on_step(i, &out);
            }
        }
    }
}
