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

/// What the head pass returns.
pub struct HeadOutput {
    /// Sum of weighted token losses divided by `normalizer`.
    pub loss: f64,
    /// dLoss/dhidden, (N, d).
    pub grad_hidden: Tensor,
}

/// Weighted mean cross-entropy of `model`'s head applied to `hidden` (N, d, no graph), with
/// gradients for the head's parameters absorbed into `grads` and returned for `hidden`.
pub fn chunked_cross_entropy(
    model: &Model,
    vars: &[Var],
    hidden: &Tensor,
    targets: &Targets,
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
        let w = targets.weights.narrow(0, start, len)?.to_dtype(hidden.dtype())?;
        let token_loss = cross_entropy_rows(&model.logits(h.as_tensor())?, &ids)?; // (len,)
        let chunk_loss = ((token_loss * w)?.sum_all()? / normalizer)?;
        loss += chunk_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = chunk_loss.backward()?;
        grads.absorb(&store, vars)?;
        grad_chunks.push(grad_or_zeros(&store, h.as_tensor())?);
        start += len;
    }
    Ok(HeadOutput { loss, grad_hidden: Tensor::cat(&grad_chunks, 0)? })
}

/// -log softmax(logits)[target] per row, computed stably: logsumexp - logit[target].
pub fn cross_entropy_rows(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let picked = logits.gather(&ids.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}
