//! `POST /v1/completions` (legacy): raw prompts, no chat template. Streamed chunks have the
//! same `text_completion` shape as the full response, with partial `text`.

use crate::api::error::ApiError;
use crate::api::stream::{self, finish_reason, reported_logprob, usage, ChunkFormat, Envelope};
use crate::api::validation::{self, SamplingFields, ValidationError, MAX_TOP_LOGPROBS};
use crate::api::{chat, read_body, structured_outputs, AppState};
use crate::engine::registry::ServedModel;
use crate::engine::{unix_now, GenerateRequest};
use crate::model::generate::{GenerationParams, StepOutput, TokenLogprob};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: i64 = 16;

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    pub max_tokens: Option<i64>,
    pub echo: Option<bool>,
    /// Top alternatives per token (an integer here, a boolean in chat).
    pub logprobs: Option<i64>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    /// rewind's extension (vLLM style): regex, Lark grammar, choice or JSON Schema.
    pub structured_outputs: Option<Value>,
    /// Read from the same body by [`stream::prepare`].
    #[serde(skip)]
    pub sampling: SamplingFields,
}

pub struct CompletionJob {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// The prompt texts, prepended to each choice with `echo`.
    pub echo: Option<Vec<String>>,
    pub prompt_tokens: usize,
}

impl stream::GenerationBody for CompletionRequest {
    type Validated = CompletionJob;

    fn model(&self) -> &str {
        &self.model
    }

    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }

    fn validate(
        self,
        model: Arc<ServedModel>,
        state: &AppState,
    ) -> Result<CompletionJob, ApiError> {
        let limits = &state.settings.limits;
        let sampling = self.sampling.validate(model.vocab_size, limits)?;
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ValidationError::Unsupported {
                param: "suffix",
                reason: "the served models do not fill in the middle".into(),
            }
            .into());
        }
        if let Some(best_of) = self.best_of {
            if best_of < sampling.n as i64 {
                return Err(ValidationError::OutOfRange {
                    param: "best_of",
                    value: best_of.to_string(),
                    range: "[n, n]".into(),
                }
                .into());
            }
            if best_of > sampling.n as i64 {
                return Err(ValidationError::Unsupported {
                    param: "best_of",
                    reason: "only best_of = n is served".into(),
                }
                .into());
            }
        }
        let top = self.logprobs.unwrap_or(0);
        if self.logprobs.is_some() && !(0..=MAX_TOP_LOGPROBS).contains(&top) {
            return Err(ValidationError::OutOfRange {
                param: "logprobs",
                value: top.to_string(),
                range: format!("[0, {MAX_TOP_LOGPROBS}]"),
            }
            .into());
        }
        let tokenizer = &model.tokenizer;
        let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
            let mut ids = Vec::new();
            if tokenizer.add_bos {
                ids.extend(tokenizer.bos_id);
            }
            ids.extend(
                tokenizer
                    .encode(text, true)
                    .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e:#}")))?,
            );
            Ok(ids)
        };
        let (texts, prompts): (Vec<String>, Vec<Vec<u32>>) = match self.prompt {
            PromptField::Text(t) => (vec![t.clone()], vec![encode(&t)?]),
            PromptField::Texts(ts) => {
                let ids = ts
                    .iter()
                    .map(|t| encode(t))
                    .collect::<Result<Vec<_>, _>>()?;
                (ts, ids)
            }
            PromptField::Tokens(ids) => (vec![String::new()], vec![ids]),
            PromptField::TokenLists(lists) => (vec![String::new(); lists.len()], lists),
        };
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(ValidationError::EmptyPrompt.into());
        }
        if let Some(&id) = prompts
            .iter()
            .flatten()
            .find(|&&id| id as usize >= model.vocab_size)
        {
            return Err(ValidationError::PromptToken {
                id: id as u64,
                vocab: model.vocab_size,
            }
            .into());
        }
        let texts = if texts.iter().all(String::is_empty) && self.echo == Some(true) {
            // Token prompts echo as their decoded text.
            prompts
                .iter()
                .map(|p| tokenizer.decode(p, false).unwrap_or_default())
                .collect()
        } else {
            texts
        };
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let requested = Some(self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
        let max_tokens = validation::max_tokens(
            requested,
            "max_tokens",
            longest,
            model.context_length,
            limits.max_tokens,
            "prompt",
        )?;
        let params = GenerationParams {
            max_tokens,
            sampling: sampling.params,
            stop: sampling.stop,
            stop_token_ids: Vec::new(),
            logprobs: self.logprobs.map(|t| t as usize),
        };
        let prompt_tokens = prompts.iter().map(Vec::len).sum();
        let grammar = structured_outputs::spec(self.structured_outputs.as_ref(), limits)?
            .map(|spec| chat::compile(&model, &spec, ValidationError::StructuredOutputs))
            .transpose()?;
        Ok(CompletionJob {
            generate: GenerateRequest {
                model,
                prompts,
                n: sampling.n,
                params,
                grammar,
            },
            stream: sampling.stream,
            include_usage: sampling.include_usage,
            logprobs: self.logprobs.is_some(),
            echo: (self.echo == Some(true)).then_some(texts),
            prompt_tokens,
        })
    }
}

/// The `logprobs` object of a completion choice (or of one chunk's tokens). `offset` is the
/// character offset of the first token in the choice's text.
fn logprobs_object(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.token.chars().count();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| t.top.iter().map(|(s, _, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, &req, payload).await?;
    let (model, job) = stream::prepare::<CompletionRequest>(&state, body).await?;
    let n = job.generate.n;
    let choices = job.generate.choices();
    let events = stream::submit(&state.engine, job.generate)?;
    let envelope = Envelope {
        id: stream::response_id("cmpl"),
        created: unix_now(),
        model: model.clone(),
        object: "text_completion",
        chunk_object: "text_completion",
        include_usage: job.include_usage,
    };
    let echo_of = |choice: usize| {
        job.echo
            .as_ref()
            .map(|texts| texts[choice / n].clone())
            .unwrap_or_default()
    };
    if job.stream {
        let format = CompletionChunks {
            envelope,
            logprobs: job.logprobs,
            prompt_tokens: job.prompt_tokens,
            completion_tokens: 0,
            echo: (0..choices).map(&echo_of).collect(),
            offsets: vec![0; choices],
        };
        return Ok(stream::sse_response(events, format));
    }
    let outputs = stream::collect(&model, events, choices).await?;
    let completion_tokens = outputs.iter().map(|c| c.tokens).sum();
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, output)| {
            let prefix = echo_of(index);
            let logprobs = job
                .logprobs
                .then(|| logprobs_object(&output.logprobs, prefix.chars().count()));
            json!({
                "index": index,
                "text": prefix + &output.text,
                "logprobs": logprobs,
                "finish_reason": output.finish.map(finish_reason),
            })
        })
        .collect();
    Ok(HttpResponse::Ok()
        .json(envelope.response(choices, usage(job.prompt_tokens, completion_tokens))))
}

struct CompletionChunks {
    envelope: Envelope,
    logprobs: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Echoed prompts, sent as each choice's first chunk.
    echo: Vec<String>,
    /// Characters sent so far per choice, for `text_offset`.
    offsets: Vec<usize>,
}

impl CompletionChunks {
    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        self.envelope.chunk(
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        )
    }
}

impl ChunkFormat for CompletionChunks {
    fn start(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        for i in 0..self.echo.len() {
            if !self.echo[i].is_empty() {
                out.push(self.chunk(i, &self.echo[i], Value::Null, None));
                self.offsets[i] = self.echo[i].chars().count();
            }
        }
        out
    }

    fn token(&mut self, choice: usize, output: StepOutput) -> Vec<Value> {
        self.completion_tokens += 1;
        let mut out = Vec::new();
        let logprob = if self.logprobs {
            reported_logprob(&self.envelope.model, &output)
        } else {
            None
        };
        if !output.text.is_empty() || logprob.is_some() {
            let logprobs = match &logprob {
                Some(lp) => logprobs_object(std::slice::from_ref(lp), self.offsets[choice]),
                None => Value::Null,
            };
            out.push(self.chunk(choice, &output.text, logprobs, None));
            self.offsets[choice] += output.text.chars().count();
        }
        if let Some(reason) = output.finish {
            out.push(self.chunk(choice, "", Value::Null, Some(finish_reason(reason))));
        }
        out
    }

    fn end(&mut self) -> Vec<Value> {
        self.envelope
            .usage_chunk(usage(self.prompt_tokens, self.completion_tokens))
    }
}
