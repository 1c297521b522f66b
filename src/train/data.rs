//! Training data: OpenAI fine-tuning JSONL (`{"messages": [...]}` chats, or legacy
//! `{"prompt", "completion"}` pairs), validated line by line, tokenised with the model's own
//! chat template (the function the server uses), and batched by length.

use crate::text::chat_template::{ChatMessage, ChatTemplate};
use crate::text::openai_message::{self, MessageError};
use crate::text::tokenizer::TextTokenizer;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// One training example as written in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat(Vec<ChatMessage>),
    PromptCompletion { prompt: String, completion: String },
}

/// A validation failure, naming the line (1-based) and the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

/// Parses and validates one JSONL line.
pub fn parse_line(line: &str) -> std::result::Result<Example, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let obj = value.as_object().ok_or("each line must be a JSON object")?;
    if let Some(messages) = obj.get("messages") {
        let messages = messages.as_array().ok_or("`messages` must be an array")?;
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            // The same mapping serving uses, so training and serving see one prompt.
            let message = openai_message::from_openai(m).map_err(|e| match e {
                MessageError::Role(role) if role.is_empty() => {
                    format!("messages[{i}] has no string `role`")
                }
                MessageError::Role(role) => format!(
                    "messages[{i}] has role `{role}`; expected one of {}",
                    openai_message::ROLES.join(", ")
                ),
                MessageError::Content(reason) => format!("messages[{i}].content: {reason}"),
            })?;
            if message.role != "assistant"
                && message.content.is_empty()
                && message.tool_calls.is_none()
            {
                return Err(format!(
                    "messages[{i}] ({}) has empty content",
                    message.role
                ));
            }
            out.push(message);
        }
        if !out
            .iter()
            .any(|m| m.role == "assistant" && !m.content.is_empty())
        {
            return Err("no assistant message with content: nothing to train on".into());
        }
        return Ok(Example::Chat(out));
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(Value::String(p)), Some(Value::String(c))) => {
            if c.is_empty() {
                return Err("`completion` is empty: nothing to train on".into());
            }
            Ok(Example::PromptCompletion {
                prompt: p.clone(),
                completion: c.clone(),
            })
        }
        (Some(_), Some(_)) => Err("`prompt` and `completion` must be strings".into()),
        _ => Err(
            "expected a `messages` array (chat format) or `prompt` and `completion` strings".into(),
        ),
    }
}

/// Parses a whole JSONL text; blank lines are skipped. All errors are collected.
pub fn parse_jsonl(text: &str) -> std::result::Result<Vec<Example>, Vec<LineError>> {
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(e) => examples.push(e),
            Err(reason) => errors.push(LineError {
                line: i + 1,
                reason,
            }),
        }
    }
    if examples.is_empty() && errors.is_empty() {
        errors.push(LineError {
            line: 1,
            reason: "the file has no examples".into(),
        });
    }
    if errors.is_empty() {
        Ok(examples)
    } else {
        Err(errors)
    }
}

/// Reads a JSONL file; the error names the file, the first failing lines and the fix.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse_jsonl(&text).map_err(|errors| {
        let shown: Vec<String> = errors.iter().take(5).map(|e| format!("{}:{}", path.display(), e)).collect();
        let more = if errors.len() > 5 { format!("\n... and {} more", errors.len() - 5) } else { String::new() };
        anyhow::anyhow!(
            "{} invalid line(s):\n{}{more}\nEach line must be {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} with an assistant turn, or {{\"prompt\": ..., \"completion\": ...}}",
            errors.len(),
            shown.join("\n")
        )
    })
}

/// Token ids with a loss weight per position: `weights[i]` weighs predicting `ids[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl TokenizedExample {
    /// Number of trained target tokens.
    pub fn trained_tokens(&self) -> usize {
        self.weights.iter().skip(1).filter(|&&w| w > 0.0).count()
    }
}

/// What to do with examples longer than the sequence length.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    Truncate,
    Refuse,
}

/// Tokenises an example. Chats train only on assistant turns (their content and end-of-turn
/// marker); prompt/completion pairs train on the completion and an end-of-sequence token.
pub fn tokenize(
    example: &Example,
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
) -> Result<TokenizedExample> {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    let mut push = |text: &str, trained: bool, ids: &mut Vec<u32>| -> Result<()> {
        let piece = tokenizer.encode(text, true)?;
        weights.extend(std::iter::repeat_n(
            if trained { 1.0 } else { 0.0 },
            piece.len(),
        ));
        ids.extend(piece);
        Ok(())
    };
    match example {
        Example::Chat(messages) => {
            let (text, spans) = template.render_with_assistant_spans(messages)?;
            let mut at = 0;
            for span in spans {
                push(&text[at..span.start], false, &mut ids)?;
                push(&text[span.start..span.end], true, &mut ids)?;
                at = span.end;
            }
            push(&text[at..], false, &mut ids)?;
        }
        Example::PromptCompletion { prompt, completion } => {
            push(prompt, false, &mut ids)?;
            push(completion, true, &mut ids)?;
            if let Some(&eos) = tokenizer.eos_ids.first() {
                ids.push(eos);
                weights.push(1.0);
            }
        }
    }
    Ok(TokenizedExample { ids, weights })
}

/// Applies the overflow policy; `index` names the example in errors.
pub fn fit_length(
    mut ex: TokenizedExample,
    max_len: usize,
    overflow: Overflow,
    index: usize,
) -> Result<TokenizedExample> {
    if ex.ids.len() > max_len {
        if overflow == Overflow::Refuse {
            bail!("example {} has {} tokens, more than the sequence length {max_len} (raise --seq-len or use --overflow truncate)", index + 1, ex.ids.len());
        }
        ex.ids.truncate(max_len);
        ex.weights.truncate(max_len);
    }
    Ok(ex)
}

/// A padded batch ready for the model: inputs (B, T), targets (B*T,), weights (B*T,).
pub struct PaddedBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    pub trained_tokens: usize,
    pub tokens: usize,
}

/// Pads examples to the longest one; positions past an example's end get weight 0.
pub fn pad_batch(
    examples: &[&TokenizedExample],
    pad_id: u32,
    device: &Device,
) -> Result<PaddedBatch> {
    let t = examples
        .iter()
        .map(|e| e.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let b = examples.len();
    let (mut inputs, mut targets, mut weights) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    let mut tokens = 0;
    for ex in examples {
        let n = ex.ids.len().saturating_sub(1);
        tokens += n;
        for i in 0..t {
            if i < n {
                inputs.push(ex.ids[i]);
                targets.push(ex.ids[i + 1]);
                weights.push(ex.weights[i + 1]);
            } else {
                inputs.push(pad_id);
                targets.push(pad_id);
                weights.push(0.0);
            }
        }
    }
    let trained_tokens = weights.iter().filter(|&&w| w > 0.0).count();
    Ok(PaddedBatch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, b * t, device)?,
        weights: Tensor::from_vec(weights, b * t, device)?,
        trained_tokens,
        tokens,
    })
}

/// Groups example indices into batches of similar length (less padding): sorted by length,
/// cut into batches, and the batch order shuffled by `seed` so epochs differ.
pub fn length_batches(lengths: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    batches.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_line_and_rule() {
        let text = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"hello\"}]}\n\
                    not json\n\
                    {\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n\
                    {\"messages\":[{\"role\":\"wizard\",\"content\":\"hi\"}]}\n\
                    {\"foo\":1}\n\
                    {\"prompt\":\"a\",\"completion\":\"b\"}\n";
        let errors = parse_jsonl(text).unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
        assert!(errors[0].reason.contains("invalid JSON"));
        assert!(errors[1].reason.contains("no assistant message"));
        assert!(errors[2].reason.contains("role `wizard`"));
        assert!(errors[3].reason.contains("expected a `messages` array"));
    }

    #[test]
    fn array_content_is_flattened() {
        let e = parse_line(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"assistant","content":"c"}]}"#).unwrap();
        assert_eq!(
            e,
            Example::Chat(vec![
                ChatMessage::new("user", "ab"),
                ChatMessage::new("assistant", "c")
            ])
        );
    }

    #[test]
    fn padding_masks_past_the_end() {
        let a = TokenizedExample {
            ids: vec![1, 2, 3],
            weights: vec![0.0, 1.0, 1.0],
        };
        let b = TokenizedExample {
            ids: vec![4, 5],
            weights: vec![0.0, 1.0],
        };
        let p = pad_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            p.inputs.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2], vec![4, 0]]
        );
        assert_eq!(p.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 5, 0]);
        assert_eq!(
            p.weights.to_vec1::<f32>().unwrap(),
            vec![1.0, 1.0, 1.0, 0.0]
        );
        assert_eq!(p.trained_tokens, 3);
    }

    #[test]
    fn length_batches_cover_everything_once() {
        let lengths = [5, 1, 9, 3, 7, 2, 8];
        let batches = length_batches(&lengths, 3, 1);
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert!(batches.iter().all(|b| b.len() <= 3));
    }
}
