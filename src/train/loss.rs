//! The LM head and cross-entropy, in row chunks: each chunk's logits are built, differentiated
//! and dropped before the next, so the whole batch's (N, vocab) logits never exist at once
//! (at small model scale they would dominate activation memory).

use crate::model::decoder::Model;
use crate::train::grads::{grad_or_zeros, Grads};
use candle_core::{DType, Result, Tensor, Var, D};

/// Targets of a batch, flattened over (B, T).
pub struct Targets {
    /// Next-token ids, (N,) u32.
    pub ids: Tensor,
    /// Per-row loss weight, (N,): 1 on trained (assistant) tokens, 0 elsewhere.
    pub weights: Tensor,
}

/// What the head's loss compares the student's distribution with.
pub enum Objective<'a> {
    /// Cross-entropy against the next tokens.
    NextToken,
    /// Distillation: KL(teacher || student) per row, the teacher's logits rebuilt chunk by
    /// chunk from its final hidden states (N, d) so they never exist whole either.
    Distill {
        teacher: &'a Model,
        teacher_hidden: Tensor,
    },
}

/// What the head pass returns.
pub struct HeadOutput {
    /// Sum of weighted token losses divided by `normalizer`.
    pub loss: f64,
    /// dLoss/dhidden, (N, d).
    pub grad_hidden: Tensor,
}

/// Weighted loss (summed, divided by `normalizer`) of `model`'s head applied to `hidden`
/// (N, d, no graph), with gradients for the head's parameters absorbed into `grads` and
/// returned for `hidden`.
#[allow(clippy::too_many_arguments)]
pub fn chunked_head_loss(
    model: &Model,
    vars: &[Var],
    hidden: &Tensor,
    targets: &Targets,
    objective: &Objective<'_>,
    normalizer: f64,
    chunk_rows: usize,
    grads: &mut Grads,
) -> Result<HeadOutput> {
    let n = hidden.dim(0)?;
    let mut loss = 0.0;
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let h = Var::from_tensor(&hidden.narrow(0, start, len)?)?;
        let ids = targets.ids.narrow(0, start, len)?;
        let w = targets
            .weights
            .narrow(0, start, len)?
            .to_dtype(hidden.dtype())?;
        let token_loss = row_loss(&model.logits(h.as_tensor())?, &ids, objective, start)?; // (len,)
        let chunk_loss = ((token_loss * w)?.sum_all()? / normalizer)?;
        loss += chunk_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = chunk_loss.backward()?;
        grads.absorb(&store, vars)?;
        grad_chunks.push(grad_or_zeros(&store, h.as_tensor())?);
        start += len;
    }
    Ok(HeadOutput {
        loss,
        grad_hidden: Tensor::cat(&grad_chunks, 0)?,
    })
}

/// Loss of each row of a chunk of logits starting at row `start` of the batch.
fn row_loss(
    logits: &Tensor,
    ids: &Tensor,
    objective: &Objective<'_>,
    start: usize,
) -> Result<Tensor> {
    match objective {
        Objective::NextToken => cross_entropy_rows(logits, ids),
        Objective::Distill {
            teacher,
            teacher_hidden,
        } => {
            let t = teacher
                .logits(&teacher_hidden.narrow(0, start, logits.dim(0)?)?)?
                .to_dtype(logits.dtype())?
                .detach();
            kl_rows(&t, logits)
        }
    }
}

/// Weighted sum of row losses of `model`'s head on `hidden` (no gradients), chunked.
pub fn head_loss_sum(
    model: &Model,
    hidden: &Tensor,
    targets: &Targets,
    objective: &Objective<'_>,
    chunk_rows: usize,
) -> Result<f64> {
    let n = hidden.dim(0)?;
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let logits = model.logits(&hidden.narrow(0, start, len)?)?;
        let loss = row_loss(
            &logits,
            &targets.ids.narrow(0, start, len)?,
            objective,
            start,
        )?;
        let w = targets
            .weights
            .narrow(0, start, len)?
            .to_dtype(loss.dtype())?;
        total += (loss * w)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        start += len;
    }
    Ok(total)
}

/// log softmax over the last axis, stably.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// KL(p_teacher || p_student) per row from the two logit matrices.
pub fn kl_rows(teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    let lt = log_softmax(teacher)?;
    (lt.exp()? * (lt - log_softmax(student)?)?)?.sum(D::Minus1)
}

/// -log softmax(logits)[target] per row, computed stably: logsumexp - logit[target].
pub fn cross_entropy_rows(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let picked = logits.gather(&ids.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}
