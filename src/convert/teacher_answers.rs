//! Sequence-level distillation data: the original model's own greedy answers to a set of
//! instruction prompts. Distilling on the teacher's trajectories teaches the student exactly
//! the positions greedy decoding visits, which chat text written by people does not cover.
//! The answers are generated once and cached as OpenAI chat JSONL, so a resumed conversion
//! trains on the same data.

use crate::model::generate::{run_to_completion, GenerationParams, Sequence};
use crate::model::loader::LoadedModel;
use crate::model::sampling::SamplingParams;
use crate::text::chat_template::ChatMessage;
use crate::train::data::{self, Example};
use anyhow::Result;
use std::path::Path;

/// Instruction prompts of many kinds (facts, poems, tips, explanations, small talk). The
/// evaluation prompts of `eval::PROMPTS` are deliberately not among them.
pub const INSTRUCTION_PROMPTS: &str = include_str!("instruction_prompts.txt");

/// Sequences decoded together while generating.
const GENERATION_BATCH: usize = 24;

/// The teacher's greedy answers (at most `max_tokens` each) to every prompt, read from `cache`
/// when a previous run wrote it, else generated and written there.
pub fn load_or_generate(
    teacher: &LoadedModel,
    prompts: &[&str],
    max_tokens: usize,
    cache: &Path,
) -> Result<Vec<Example>> {
    if cache.exists() {
        let cached = data::read_jsonl(cache)?;
        if cached.len() == prompts.len() {
            tracing::info!(path = %cache.display(), "reusing the teacher's cached answers");
            return Ok(cached);
        }
    }
    let mut chats = Vec::with_capacity(prompts.len());
    for (done, chunk) in prompts.chunks(GENERATION_BATCH).enumerate() {
        chats.extend(generate(teacher, chunk, max_tokens)?);
        tracing::info!(
            answered = (done * GENERATION_BATCH + chunk.len()),
            of = prompts.len(),
            "teacher answers"
        );
    }
    let lines: Vec<String> = chats
        .iter()
        .map(|messages| serde_json::json!({ "messages": messages }).to_string())
        .collect();
    crate::durable::write_file(cache, (lines.join("\n") + "\n").as_bytes())?;
    Ok(chats.into_iter().map(Example::Chat).collect())
}

/// One batch of greedy answers, decoded together, as (user, assistant) chats.
fn generate(
    teacher: &LoadedModel,
    prompts: &[&str],
    max_tokens: usize,
) -> Result<Vec<Vec<ChatMessage>>> {
    let params = GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut seqs = prompts
        .iter()
        .map(|p| {
            let text = teacher
                .chat_template
                .render(&[ChatMessage::user(*p)], true, None)?;
            let ids = teacher.tokenizer.encode(&text, true)?;
            Ok(Sequence::new(&teacher.model, ids, params.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut answers = vec![String::new(); prompts.len()];
    run_to_completion(&teacher.model, &teacher.tokenizer, &mut seqs, |i, step| {
        answers[i].push_str(&step.text)
    })?;
    Ok(prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| vec![ChatMessage::user(*p), ChatMessage::assistant(a)])
        .collect())
}

/// The prompts of `INSTRUCTION_PROMPTS`, one per non-empty line.
pub fn instruction_prompts() -> Vec<&'static str> {
    INSTRUCTION_PROMPTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// `answers` spread evenly through `text`, so every stretch of the mix holds both kinds.
pub fn interleave<T>(text: Vec<T>, answers: Vec<T>) -> Vec<T> {
    if answers.is_empty() {
        return text;
    }
    let every = (text.len() / answers.len()).max(1);
    let mut out = Vec::with_capacity(text.len() + answers.len());
    let mut answers = answers.into_iter();
    for (i, example) in text.into_iter().enumerate() {
        if i % every == 0 {
            out.extend(answers.next());
        }
        out.push(example);
    }
    out.extend(answers);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_exclude_the_evaluation_prompts() {
        let prompts = instruction_prompts();
        assert!(prompts.len() >= 100);
        for p in crate::convert::eval::PROMPTS {
            assert!(!prompts.contains(&p), "{p}");
        }
    }

    #[test]
    fn interleave_spreads_answers_through_the_text() {
        let text: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
        let answers = vec!["a0".to_string(), "a1".into(), "a2".into()];
        assert_eq!(
            interleave(text, answers),
            ["a0", "t0", "t1", "a1", "t2", "t3", "a2", "t4", "t5"]
        );
    }
}
