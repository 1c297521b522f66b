//! The attention softmax with its causal mask, and its backward, as one parallel pass over the
//! rows of f32 CPU scores.
//!
//! The composite form (scale, add a mask tensor, softmax; in the backward multiply, row sums,
//! subtract, multiply, scale) is five to eight passes, most of them on one core, and was the
//! largest cost of a CPU training step after the matrix products. Here each row is read once
//! while in cache; the mask is the row's position, so no mask tensor exists. Other dtypes and
//! devices keep the composite (`attention`), which the tests use as the reference.

use crate::model::ops::on_cpu_f32;
use crate::model::parallel;
use crate::model::vector_math::{exp, max_of, sum_f64, wide};
use candle_core::{Result, Tensor};

/// Which keys each row of a score matrix sees: row r belongs to the query at position
/// `first_position + r % len` (query heads sharing a key head are stacked, so positions repeat
/// every `len` rows) and sees keys at positions up to its own.
#[derive(Clone, Copy)]
pub struct CausalRows {
    pub len: usize,
    pub first_position: usize,
}

impl CausalRows {
    /// Keys row `r` sees, of `keys`.
    fn visible(&self, r: usize, keys: usize) -> usize {
        (self.first_position + r % self.len.max(1) + 1).min(keys)
    }
}

/// softmax(scale * scores + causal mask) over the last dimension, for contiguous f32 CPU
/// scores (None for anything else). Hidden keys get exactly 0.
pub fn forward(scores: &Tensor, scale: f64, rows: CausalRows) -> Option<Result<Tensor>> {
    let keys = scores.dims().last().copied().filter(|&k| k > 0)?;
    let scale = scale as f32;
    let probabilities = on_cpu_f32(&[scores], |s| {
        let s = s[0];
        let mut out = vec![0f32; s.len()];
        parallel::map_rows(&mut out, keys, |r, out| {
            let visible = rows.visible(r, keys);
            let s = &s[r * keys..r * keys + visible];
            // Rounding is monotonic, so the largest scaled score is the scaled largest one.
            let max = max_of(s) * scale;
            let out = &mut out[..visible];
            wide(|| {
                for (o, &v) in out.iter_mut().zip(s) {
                    *o = exp(v * scale - max);
                }
            });
            let inverse = (1.0 / sum_f64(out)) as f32;
            wide(|| out.iter_mut().for_each(|o| *o *= inverse));
        });
        out
    })?;
    Some(probabilities.and_then(|p| Tensor::from_vec(p, scores.shape(), scores.device())))
}

/// The cotangent of `forward`'s scores for its output `p` and that output's cotangent `grad_p`:
/// scale * p * (grad_p - rowsum(grad_p * p)). None unless both are contiguous f32 CPU tensors.
pub fn backward(p: &Tensor, grad_p: &Tensor, scale: f64) -> Option<Result<Tensor>> {
    let keys = p.dims().last().copied().filter(|&k| k > 0)?;
    let scale = scale as f32;
    let grad = on_cpu_f32(&[p, grad_p], |t| {
        let (p, dp) = (t[0], t[1]);
        let mut out = vec![0f32; p.len()];
        parallel::map_rows(&mut out, keys, |r, out| {
            let row = r * keys..(r + 1) * keys;
            let (p, dp) = (&p[row.clone()], &dp[row]);
            let dot: f64 = p.iter().zip(dp).map(|(&p, &d)| f64::from(p * d)).sum();
            let dot = dot as f32;
            wide(|| {
                for ((o, &p), &d) in out.iter_mut().zip(p).zip(dp) {
                    *o = p * (d - dot) * scale;
                }
            });
        });
        out
    })?;
    Some(grad.and_then(|g| Tensor::from_vec(g, p.shape(), p.device())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::max_abs_diff;
    use candle_core::{DType, Device, D};

    /// The composite in f64: scale, -inf above the diagonal, softmax.
    fn composite(scores: &Tensor, scale: f64, rows: CausalRows) -> Tensor {
        let (n, keys) = scores.dims2().unwrap();
        let mask: Vec<f64> = (0..n * keys)
            .map(|i| {
                if i % keys < rows.visible(i / keys, keys) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, keys), &Device::Cpu).unwrap();
        let s = ((scores.to_dtype(DType::F64).unwrap() * scale).unwrap() + mask).unwrap();
        let max = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    /// Rows of two stacked heads (positions repeat), queries starting at position 3 of 12 keys
    /// (a continued sequence), so some rows see every key and some few.
    #[test]
    fn matches_the_f64_composite_forward_and_backward() {
        let dev = Device::Cpu;
        let rows = CausalRows {
            len: 9,
            first_position: 3,
        };
        let (n, keys, scale) = (2 * 9 * 3, 12, 0.37);
        let scores = (Tensor::randn(0f32, 4.0, (n, keys), &dev).unwrap())
            .contiguous()
            .unwrap();
        let p = forward(&scores, scale, rows).unwrap().unwrap();
        let want = composite(&scores, scale, rows);
        assert!(
            max_abs_diff(&p, &want) < 1e-6,
            "{}",
            max_abs_diff(&p, &want)
        );
        let hidden = p.to_vec2::<f32>().unwrap();
        for (r, row) in hidden.iter().enumerate() {
            assert!(row[rows.visible(r, keys)..].iter().all(|&v| v == 0.0));
        }

        let dp = Tensor::randn(0f32, 1.0, (n, keys), &dev).unwrap();
        let got = backward(&p, &dp, scale).unwrap().unwrap();
        let (p64, dp64) = (want, dp.to_dtype(DType::F64).unwrap());
        let inner = (&dp64 * &p64).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = ((p64 * dp64.broadcast_sub(&inner).unwrap()).unwrap() * scale).unwrap();
        assert!(
            max_abs_diff(&got, &want) < 1e-6,
            "{}",
            max_abs_diff(&got, &want)
        );
    }

    #[test]
    fn other_dtypes_take_the_composite() {
        let scores = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        let rows = CausalRows {
            len: 2,
            first_position: 0,
        };
        assert!(forward(&scores, 1.0, rows).is_none());
        assert!(backward(&scores, &scores, 1.0).is_none());
    }
}
