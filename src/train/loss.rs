//! The LM head and cross-entropy, in row chunks: each chunk's logits are built, differentiated
//! and dropped before the next, so the whole batch's (N, vocab) logits never exist at once
//! (at small model scale they would dominate activation memory).

use crate::kernels::vector_math::{exp, max_of, sum_f64, wide};
use crate::model::decoder::Model;
use crate::model::matmul::matmul;
use crate::model::{ops, parallel};
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
///
/// The (rows, vocab) part of each chunk is differentiated in closed form (see
/// `loss_and_grad_logits`): through candle's autograd the logits went through some twenty
/// full passes (the log-softmax composite, and every gradient accumulated into a fresh zero
/// buffer), the vocabulary-sized head gradient included. Only the final RMSNorm, small at
/// (rows, d), goes through autograd.
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
    let head = model.dense_head().ok_or_else(|| {
        candle_core::Error::Msg(
            "training needs a dense LM head (no quantization, bias or adapter on it)".into(),
        )
    })?;
    let head_var = vars.iter().position(|v| v.as_tensor().id() == head.id());
    // The head in the compute dtype, cast once for every chunk.
    let w_compute = head.to_dtype(model.compute_dtype)?.detach();
    // Softmax and reductions over the vocabulary in f32 at least.
    let acc = if model.compute_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let n = hidden.dim(0)?;
    // Summed on the device and read once: a read per chunk would stall a GPU stream.
    let mut loss = Tensor::zeros((), DType::F64, hidden.device())?;
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let h = Var::from_tensor(&hidden.narrow(0, start, len)?)?;
        let x = model.final_norm(h.as_tensor())?;
        let x_data = x.detach();
        let logits = matmul(&x_data, &w_compute.t()?)?.to_dtype(acc)?;
        let row_weights = (targets.weights.narrow(0, start, len)?.to_dtype(acc)? / normalizer)?;
        let ids = targets.ids.narrow(0, start, len)?;
        let (rows, grad_logits) =
            loss_and_grad_logits(&logits, &ids, &row_weights, objective, start)?;
        loss = (loss + (rows * &row_weights)?.sum_all()?.to_dtype(DType::F64)?)?;
        drop(logits);
        let grad_logits = grad_logits.to_dtype(x.dtype())?;
        let grad_x = matmul(&grad_logits, &w_compute)?;
        if let Some(i) = head_var {
            let grad_w = matmul(&grad_logits.t()?, &x_data)?.to_dtype(head.dtype())?;
            grads.add_at(i, grad_w)?;
        }
        // Through the final norm by autograd: <x, grad_x> has gradient grad_x at x.
        let store = (x * grad_x)?.sum_all()?.backward()?;
        grads.absorb(&store, vars)?;
        grad_chunks.push(grad_or_zeros(&store, h.as_tensor())?);
        start += len;
    }
    Ok(HeadOutput {
        loss: loss.to_scalar::<f64>()?,
        grad_hidden: Tensor::cat(&grad_chunks, 0)?,
    })
}

/// Per-row losses of a chunk of logits (rows, vocab; f32 or f64) and dLoss/dlogits for the loss
/// sum_r row_weights[r] * loss[r], in closed form: softmax minus the one-hot target for
/// cross-entropy, softmax minus the teacher's softmax for KL(teacher || student).
fn loss_and_grad_logits(
    logits: &Tensor,
    ids: &Tensor,
    row_weights: &Tensor,
    objective: &Objective<'_>,
    start: usize,
) -> Result<(Tensor, Tensor)> {
    let teacher_logits = match objective {
        Objective::NextToken => None,
        Objective::Distill {
            teacher,
            teacher_hidden,
        } => Some(
            teacher
                .logits(&teacher_hidden.narrow(0, start, logits.dim(0)?)?)?
                .to_dtype(logits.dtype())?,
        ),
    };
    let teacher_logits = teacher_logits.as_ref();
    match fused_loss_and_grad(logits, ids, row_weights, teacher_logits) {
        Some(fused) => fused,
        None => composite_loss_and_grad(logits, ids, row_weights, teacher_logits),
    }
}

/// `loss_and_grad_logits` from tensor ops (any device and dtype); the reference of the fused
/// form. `teacher_logits` selects distillation.
fn composite_loss_and_grad(
    logits: &Tensor,
    ids: &Tensor,
    row_weights: &Tensor,
    teacher_logits: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let log_sum = sum.log()?;
    let scale = row_weights.unsqueeze(1)?;
    // softmax * weight, one pass over the chunk.
    let mut grad = exp.broadcast_mul(&scale.broadcast_div(&sum)?)?;
    drop(exp);
    let rows = match teacher_logits {
        None => {
            let ids = ids.unsqueeze(1)?;
            grad.scatter_add_set(&ids, &scale.neg()?, 1)?;
            // logsumexp - logit[target] = log(sum) - shifted[target].
            (log_sum - shifted.gather(&ids, 1)?)?.squeeze(1)?
        }
        Some(teacher_logits) => {
            let log_t = log_softmax(teacher_logits)?;
            let t = log_t.exp()?;
            grad = (grad - t.broadcast_mul(&scale)?)?;
            // sum t (log t - log s), with log s = shifted - log(sum).
            (t * (log_t - shifted.broadcast_sub(&log_sum)?)?)?.sum(D::Minus1)?
        }
    };
    Ok((rows, grad))
}

/// `loss_and_grad_logits` for f32 logits on the CPU, row by row in parallel: each row's
/// passes (max, exponentials and their sum, scaling) run while it is in cache, where the
/// composite makes about ten passes over the whole chunk, several single-threaded. Rows of weight 0 (prompt tokens) are
/// skipped: their gradient is 0 and their loss counts for nothing. Sums over the vocabulary
/// run in f64. None when the inputs do not suit it.
fn fused_loss_and_grad(
    logits: &Tensor,
    ids: &Tensor,
    row_weights: &Tensor,
    teacher_logits: Option<&Tensor>,
) -> Option<Result<(Tensor, Tensor)>> {
    let inputs: Vec<&Tensor> = std::iter::once(logits).chain(teacher_logits).collect();
    let (rows, vocab) = logits.dims2().ok()?;
    if row_weights.dtype() != DType::F32 || !ids.device().is_cpu() {
        return None;
    }
    let targets = match ids.to_vec1::<u32>() {
        Ok(ids) => ids,
        Err(e) => return Some(Err(e)),
    };
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Some(Err(candle_core::Error::Msg(format!(
            "target token {bad} is outside the vocabulary of {vocab}"
        ))));
    }
    let weights = match row_weights.to_vec1::<f32>() {
        Ok(w) => w,
        Err(e) => return Some(Err(e)),
    };
    let computed = ops::on_cpu_f32(&inputs, |x| {
        let mut grad = vec![0f32; rows * vocab];
        let losses = parallel::map_rows(&mut grad, vocab, |r, g| {
            let w = weights[r];
            if w == 0.0 {
                return 0.0;
            }
            let span = r * vocab..(r + 1) * vocab;
            match x.get(1) {
                None => cross_entropy_row(&x[0][span], targets[r] as usize, w, g),
                Some(teacher) => kl_row(&x[0][span.clone()], &teacher[span], w, g),
            }
        });
        (losses, grad)
    })?;
    Some(computed.and_then(|(losses, grad)| {
        Ok((
            Tensor::from_vec(losses, rows, logits.device())?,
            Tensor::from_vec(grad, (rows, vocab), logits.device())?,
        ))
    }))
}

/// Writes exp(x - max x) into `out`; returns max x and the sum of `out`.
fn exp_shifted(x: &[f32], out: &mut [f32]) -> (f32, f64) {
    let max = max_of(x);
    wide(|| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp(v - max);
        }
    });
    (max, sum_f64(out))
}

/// -log softmax(x)[target], writing w (softmax(x) - onehot(target)) into `grad`.
fn cross_entropy_row(x: &[f32], target: usize, w: f32, grad: &mut [f32]) -> f32 {
    let (max, sum) = exp_shifted(x, grad);
    let scale = (f64::from(w) / sum) as f32;
    wide(|| grad.iter_mut().for_each(|g| *g *= scale));
    grad[target] -= w;
    max + sum.ln() as f32 - x[target]
}

/// KL(softmax(t) || softmax(x)), writing w (softmax(x) - softmax(t)) into `grad`.
fn kl_row(x: &[f32], t: &[f32], w: f32, grad: &mut [f32]) -> f32 {
    let mut p_t = vec![0f32; t.len()];
    let (max_t, sum_t) = exp_shifted(t, &mut p_t);
    let (max_x, sum_x) = exp_shifted(x, grad);
    let (shift_t, shift_x) = (max_t + sum_t.ln() as f32, max_x + sum_x.ln() as f32);
    let (scale_t, scale_x) = ((1.0 / sum_t) as f32, (1.0 / sum_x) as f32);
    let mut kl = 0f64;
    for (((g, &e_t), &xv), &tv) in grad.iter_mut().zip(&p_t).zip(x).zip(t) {
        let p_t = e_t * scale_t;
        *g = w * (*g * scale_x - p_t);
        kl += f64::from(p_t * ((tv - shift_t) - (xv - shift_x)));
    }
    kl as f32
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Architecture, ModelConfig};
    use crate::model::loader::{build_model, random::RandomSource, WeightFormat};
    use crate::model::ops::max_abs_diff;
    use crate::model::reversible::ReversibleConfig;
    use crate::train::trainable::Trainable;
    use candle_core::Device;

    fn tiny(seed: u64, separate_head: bool) -> Model {
        let config = ModelConfig {
            model_type: Architecture::Llama,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            head_dim: None,
            vocab_size: 40,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 16,
            tie_word_embeddings: !separate_head,
            attention_bias: false,
        };
        let source = RandomSource {
            seed,
            separate_head,
        };
        let mut model = build_model(
            &config,
            ReversibleConfig::euler(),
            &source,
            WeightFormat::F32,
            &Device::Cpu,
        )
        .unwrap();
        model.to_precision(DType::F64).unwrap();
        model
    }

    /// The closed-form head against candle's autograd through the composite losses, in f64:
    /// the loss, every parameter gradient and the hidden gradient.
    fn check(objective: Objective<'_>, separate_head: bool) {
        let t = Trainable::new(tiny(1, separate_head), |_| true).unwrap();
        let dev = Device::Cpu;
        let n = 7;
        let hidden = Tensor::randn(0f64, 1.0, (n, 16), &dev).unwrap();
        let targets = Targets {
            ids: Tensor::new(&[3u32, 0, 39, 7, 7, 12, 25], &dev).unwrap(),
            weights: Tensor::new(&[1f32, 0., 1., 1., 0.5, 1., 1.], &dev).unwrap(),
        };
        let mut grads = Grads::new(t.vars.len());
        let out = chunked_head_loss(
            &t.graph, &t.vars, &hidden, &targets, &objective, 3.0, 3, &mut grads,
        )
        .unwrap();

        let h = Var::from_tensor(&hidden).unwrap();
        let rows = row_loss(
            &t.graph.logits(h.as_tensor()).unwrap(),
            &targets.ids,
            &objective,
            0,
        );
        let w = targets.weights.to_dtype(DType::F64).unwrap();
        let loss = ((rows.unwrap() * w).unwrap().sum_all().unwrap() / 3.0).unwrap();
        let store = loss.backward().unwrap();
        let rel = |a: &Tensor, b: &Tensor| -> f64 {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            let nb = b.sqr().unwrap().sum_all().unwrap();
            (d.to_scalar::<f64>().unwrap() / nb.to_scalar::<f64>().unwrap().max(1e-300)).sqrt()
        };
        let want = loss.to_scalar::<f64>().unwrap();
        assert!(
            (out.loss - want).abs() <= 1e-12 * want.abs(),
            "{} vs {want}",
            out.loss
        );
        assert!(rel(&out.grad_hidden, store.get(h.as_tensor()).unwrap()) < 1e-12);
        let mut checked = 0;
        for (var, got) in t.vars.iter().zip(&grads.grads) {
            if let Some(want) = store.get(var.as_tensor()) {
                let got = got.as_ref().expect("a gradient for every head parameter");
                assert!(rel(got, want) < 1e-12);
                checked += 1;
            }
        }
        // The final norm and the head (tied: the embedding).
        assert_eq!(checked, 2);
    }

    #[test]
    fn closed_form_head_matches_autograd_for_cross_entropy() {
        check(Objective::NextToken, false);
        check(Objective::NextToken, true);
    }

    #[test]
    fn closed_form_head_matches_autograd_for_distillation() {
        let teacher = tiny(2, false);
        let teacher_hidden = Tensor::randn(0f64, 1.0, (7, 16), &Device::Cpu).unwrap();
        check(
            Objective::Distill {
                teacher: &teacher,
                teacher_hidden,
            },
            true,
        );
    }

    /// The fused f32 kernel against the composite in f64 on the same values, for both
    /// objectives: losses of weighted rows and every gradient entry (zero on rows of weight 0).
    #[test]
    fn fused_rows_match_the_composite_in_f64() {
        let dev = Device::Cpu;
        let (rows, vocab) = (6, 1000);
        let logits = (Tensor::randn(0f32, 1.0, (rows, vocab), &dev).unwrap() * 4.0).unwrap();
        let teacher = (Tensor::randn(0f32, 1.0, (rows, vocab), &dev).unwrap() * 3.0).unwrap();
        let ids = Tensor::new(&[3u32, 999, 0, 500, 7, 42], &dev).unwrap();
        let weights = Tensor::new(&[1f32, 0.0, 0.25, 1.0, 0.0, 2.0], &dev).unwrap();
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for teacher in [None, Some(&teacher)] {
            let (loss, grad) = fused_loss_and_grad(&logits, &ids, &weights, teacher)
                .expect("f32 CPU inputs take the fused path")
                .unwrap();
            let (want_loss, want_grad) = composite_loss_and_grad(
                &f64_of(&logits),
                &ids,
                &f64_of(&weights),
                teacher.map(f64_of).as_ref(),
            )
            .unwrap();
            let weighted = |t: &Tensor| (f64_of(t) * f64_of(&weights)).unwrap();
            let loss_err = max_abs_diff(&weighted(&loss), &weighted(&want_loss));
            assert!(loss_err < 1e-5, "loss {loss_err:e}");
            let grad_err = max_abs_diff(&grad, &want_grad);
            // Entries are at most the row weight (2): a few f32 ulps of that.
            assert!(grad_err < 1e-6, "grad {grad_err:e}");
            let masked = grad
                .narrow(0, 1, 1)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(masked.to_scalar::<f32>().unwrap(), 0.0);
        }
        let out_of_vocab = Tensor::new(&[3u32, 1000, 0, 0, 0, 0], &dev).unwrap();
        let refused = fused_loss_and_grad(&logits, &out_of_vocab, &weights, None).unwrap();
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("outside the vocabulary"));
    }
}
