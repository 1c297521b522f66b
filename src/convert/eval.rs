//! How close a (converted) model is to its reference: KL(reference || model) and both
//! cross-entropies per token on held-out text, top-1 agreement, the reconstruction error of the
//! model's inverse, and greedy answers to fixed prompts side by side.

use crate::model::block::Layout;
use crate::model::decoder::{LogitRows, Model, SeqInput, States};
use crate::model::generate::{run_to_completion, GenerationParams, Sequence};
use crate::model::kv_cache::KvCache;
use crate::model::loader::LoadedModel;
use crate::model::sampling::SamplingParams;
use crate::text::chat_template::ChatMessage;
use crate::train::data::TokenizedExample;
use crate::train::exact;
use crate::train::loss::{cross_entropy_rows, kl_rows};
use crate::train::trainer::hidden_states;
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use serde::Serialize;

/// Held-out chat text: the last conversations of the MIT-licensed chitchat dataset, which
/// conversion never trains on (`provision::CHITCHAT_HELD_OUT`; licence beside this file).
pub const HELDOUT_CHITCHAT: &str = include_str!("heldout_chitchat.jsonl");

/// Prompts whose greedy answers are compared.
pub const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying healthy.",
];

#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub prompt: String,
    pub model: String,
    pub reference: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub reference: String,
    pub scheme: String,
    /// Mean KL(reference || model) per token, nats.
    pub kl: f64,
    /// Mean cross-entropy per token of the model and of the reference.
    pub ce: f64,
    pub ce_reference: f64,
    /// Fraction of positions where both models' argmax agree.
    pub top1_agreement: f64,
    pub tokens: usize,
    /// Max relative error of the embedding pair rebuilt by the float inverse through every
    /// layer (None for euler).
    pub reconstruction_error: Option<f64>,
    /// Whether the fixed-point (exact mode) rebuild reproduced every state bit for bit, and the
    /// bits per element per layer it keeps (None where exact mode does not apply).
    pub exact_rebuild_bit_exact: Option<bool>,
    pub exact_bits_per_element_per_layer: Option<f64>,
    pub answers: Vec<Answer>,
}

/// Per-token statistics of `model` against `reference` over `examples` (every position).
pub fn distribution_stats(
    model: &Model,
    reference: &Model,
    examples: &[TokenizedExample],
) -> Result<(f64, f64, f64, f64, usize)> {
    let (mut kl, mut ce, mut ce_ref, mut agree, mut n) = (0.0, 0.0, 0.0, 0.0, 0usize);
    for ex in examples.iter().filter(|e| e.ids.len() > 1) {
        let t = ex.ids.len() - 1;
        let inputs = Tensor::new(&ex.ids[..t], &model.device)?.unsqueeze(0)?;
        let targets = Tensor::new(&ex.ids[1..], &model.device)?;
        // A packed model is measured on the path that serves it: the CPU decode kernels,
        // prefilling the example chunk by chunk into one cache.
        let h = match model.packed {
            Some(_) => None,
            None => Some(hidden_states(model, &inputs)?),
        };
        let h_ref = hidden_states(reference, &inputs)?;
        let mut cache = KvCache::new(&model.config);
        // Chunks keep the (T, vocab) logits small.
        for start in (0..t).step_by(256) {
            let len = 256.min(t - start);
            let logits = match &h {
                Some(h) => model.logits(&h.narrow(0, start, len)?)?,
                None => model.forward_step_rows(
                    &mut [SeqInput {
                        tokens: &ex.ids[start..start + len],
                        cache: &mut cache,
                    }],
                    LogitRows::Every,
                )?,
            }
            .to_dtype(DType::F32)?;
            let logits_ref = reference
                .logits(&h_ref.narrow(0, start, len)?)?
                .to_dtype(DType::F32)?;
            let ids = targets.narrow(0, start, len)?;
            let sum = |x: Tensor| -> Result<f64> {
                Ok(x.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
            };
            kl += sum(kl_rows(&logits_ref, &logits)?)?;
            ce += sum(cross_entropy_rows(&logits, &ids)?)?;
            ce_ref += sum(cross_entropy_rows(&logits_ref, &ids)?)?;
            let same = logits
                .argmax(D::Minus1)?
                .eq(&logits_ref.argmax(D::Minus1)?)?;
            agree += sum(same.to_dtype(DType::F32)?)?;
            n += len;
        }
    }
    let m = n.max(1) as f64;
    Ok((kl / m, ce / m, ce_ref / m, agree / m, n))
}

/// Forward through every layer then the float inverse back; max relative error of the pair.
pub fn reconstruction_error(model: &Model, ids: &[u32]) -> Result<Option<f64>> {
    if !model.reversible.is_reversible() {
        return Ok(None);
    }
    let layout = || Layout::Uniform {
        batch: 1,
        seq: ids.len(),
    };
    let e = model.embed(&Tensor::new(ids, &model.device)?)?;
    let start = model.seed(&e, &mut layout())?;
    let first = model.reversible.first_scheme_layer();
    let mut s = start.clone();
    for j in first..model.layers.len() {
        s = model.step(j, &s, &mut layout())?;
    }
    for j in (first..model.layers.len()).rev() {
        s = model.inverse_step(j, &s, &mut layout())?;
    }
    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let diff = (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(diff
            / b.abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .max(1e-30))
    };
    let States { other, last } = &s;
    Ok(Some(rel(other, &start.other)?.max(rel(last, &start.last)?)))
}

/// Runs the exact-mode forward keeping every state, rebuilds them all with the fixed-point
/// inverse and reports whether every one matched bit for bit.
pub fn exact_rebuild_check(model: &Model, ids: &[u32]) -> Result<Option<(bool, f64)>> {
    if exact::unsupported_reason(model).is_some() {
        return Ok(None);
    }
    let fp = exact::FixedPoint::default();
    let layout = || Layout::Uniform {
        batch: 1,
        seq: ids.len(),
    };
    let e = model.embed(&Tensor::new(ids, &model.device)?)?;
    let fwd = exact::forward(model, &fp, &e, &mut layout(), true)?;
    let rebuilt = exact::rebuild_all(model, &fp, &fwd, &mut layout())?;
    let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
        Ok(a.ne(b)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?
            == 0.0)
    };
    let mut exact_all = true;
    for (got, want) in rebuilt.iter().zip(&fwd.stored) {
        exact_all &= same(&got.other, &want.other)? && same(&got.last, &want.last)?;
    }
    Ok(Some((exact_all, exact::buffer_bits_per_element(model)?)))
}

/// Greedy answer of a one-turn chat.
pub fn greedy_answer(loaded: &LoadedModel, prompt: &str, max_tokens: usize) -> Result<String> {
    let text = loaded
        .chat_template
        .render(&[ChatMessage::user(prompt)], true, None)?;
    let ids = loaded.tokenizer.encode(&text, true)?;
    let params = GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut seqs = [Sequence::new(&loaded.model, ids, params)];
    let mut out = String::new();
    run_to_completion(&loaded.model, &loaded.tokenizer, &mut seqs, |_, s| {
        out.push_str(&s.text)
    })?;
    Ok(out)
}

/// The full report of `model` against `reference` on `examples`.
pub fn compare(
    model: &LoadedModel,
    reference: &LoadedModel,
    examples: &[TokenizedExample],
    answer_tokens: usize,
) -> Result<EvalReport> {
    let (kl, ce, ce_reference, top1_agreement, tokens) =
        distribution_stats(&model.model, &reference.model, examples)?;
    let probe: Vec<u32> = examples
        .first()
        .map(|e| e.ids.iter().take(64).copied().collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    let exact = exact_rebuild_check(&model.model, &probe)?;
    let answers = if answer_tokens == 0 {
        Vec::new()
    } else {
        PROMPTS
            .iter()
            .map(|p| {
                Ok(Answer {
                    prompt: p.to_string(),
                    model: greedy_answer(model, p, answer_tokens)?,
                    reference: greedy_answer(reference, p, answer_tokens)?,
                })
            })
            .collect::<Result<_>>()?
    };
    Ok(EvalReport {
        model: model.source.display().to_string(),
        reference: reference.source.display().to_string(),
        scheme: model.model.reversible.label(),
        kl,
        ce,
        ce_reference,
        top1_agreement,
        tokens,
        reconstruction_error: reconstruction_error(&model.model, &probe)?,
        exact_rebuild_bit_exact: exact.map(|e| e.0),
        exact_bits_per_element_per_layer: exact.map(|e| e.1),
        answers,
    })
}
