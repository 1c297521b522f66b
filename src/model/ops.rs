//! The block's elementwise kernels: candle's fused ones, with hand-written backwards.
//!
//! candle's fused `rms_norm` and `rope` record no backward: a graph through them would silently
//! yield zero gradients. Here each kernel runs fused (no graph), and when an input is part of a
//! graph its output is recorded with its vector-Jacobian product (`custom_vjp`). Inference and
//! training, the forward and the reversible recomputation, all run the same kernels, so a
//! recomputed block is bit-identical to its forward.

use crate::kernels::isa::Isa;
use crate::kernels::vector;
use crate::kernels::vector_math::{exp, wide};
use crate::model::custom_vjp;
use crate::model::parallel::{self, ELEMENTS_PER_TASK};
use candle_core::{DType, Result, Storage, Tensor, D};

/// RMSNorm over the last dimension (f64 inputs, the reference computations, are normalised by
/// a composite: candle has no fused f64 kernel).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let out = if x.dtype() == DType::F64 {
        let x = x.detach();
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?
            .broadcast_mul(&weight.detach().to_dtype(DType::F64)?)?
    } else {
        let weight = weight.detach().to_dtype(x.dtype())?;
        candle_nn::ops::rms_norm(&x.detach().contiguous()?, &weight, eps as f32)?
    };
    custom_vjp::record2(x, weight, out, move |x, w, g| rms_norm_vjp(x, w, eps, g))
}

/// Cotangents of x and the gain for y = x r w, r = (mean(x^2) + eps)^-1/2:
/// dx = r (g w - x r^2 mean(g w x)), dw = sum over rows of g x r; in f32 at least.
pub fn rms_norm_vjp(x: &Tensor, w: &Tensor, eps: f64, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = w.elem_count();
    let fits = d > 0
        && x.dims().last() == Some(&d)
        && x.device().is_cpu()
        && [x.dtype(), w.dtype()] == [DType::F32; 2];
    let fused = fits
        .then(|| w.flatten_all()?.to_vec1::<f32>())
        .transpose()?
        .and_then(|gain| on_cpu_f32(&[x, g], |t| rms_norm_vjp_rows(t[0], t[1], &gain, eps)));
    if let Some((grad_x, grad_w)) = fused.transpose()? {
        let grad_x = Tensor::from_vec(grad_x, x.shape(), x.device())?;
        let grad_w = Tensor::from_vec(grad_w, w.shape(), w.device())?;
        return Ok((grad_x, grad_w));
    }
    let work = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    let (x, g) = (x.to_dtype(work)?, g.to_dtype(work)?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let gw = g.broadcast_mul(&w.to_dtype(work)?)?;
    let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
    let grad_x = (gw - x.broadcast_mul(&(r.sqr()? * dot)?)?)?.broadcast_mul(&r)?;
    let d = x.dim(D::Minus1)?;
    let grad_w = (g * x.broadcast_mul(&r)?)?.reshape(((), d))?.sum(0)?;
    Ok((grad_x.to_dtype(x_dtype)?, grad_w.to_dtype(w_dtype)?))
}

/// Rows per task of the fused RMSNorm backward: each block sums its own share of the gain's
/// gradient, and the blocks' sums are added in block order, so the result does not depend on
/// the thread count.
const NORM_ROWS_PER_TASK: usize = 16;

/// `rms_norm_vjp` over f32 rows in one parallel pass, with sums in f64.
/// x and g are rows as long as the gain w.
fn rms_norm_vjp_rows(x: &[f32], g: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut grad_x = vec![0f32; x.len()];
    let partial_w = parallel::map_chunks(&mut grad_x, NORM_ROWS_PER_TASK * d, |c, out| {
        let mut dw = vec![0f64; d];
        wide(|| {
            for (r, out) in out.chunks_mut(d).enumerate() {
                let at = (c * NORM_ROWS_PER_TASK + r) * d;
                let (x, g) = (&x[at..at + d], &g[at..at + d]);
                let (mut squares, mut dot) = (0f64, 0f64);
                for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                    squares += f64::from(x) * f64::from(x);
                    dot += f64::from(g) * f64::from(w) * f64::from(x);
                }
                let r = 1.0 / (squares / d as f64 + eps).sqrt();
                let (r32, shift) = (r as f32, (r * r * r * dot / d as f64) as f32);
                for i in 0..d {
                    out[i] = r32 * g[i] * w[i] - x[i] * shift;
                    dw[i] += f64::from(g[i]) * f64::from(x[i]) * r;
                }
            }
        });
        dw
    });
    let mut grad_w = vec![0f64; d];
    for part in &partial_w {
        grad_w.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    (grad_x, grad_w.into_iter().map(|v| v as f32).collect())
}

/// Softmax over the last dimension (candle's fused kernel: training differentiates attention by
/// hand, see `attention`, so no graph ever runs through it).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// Rotary embedding in the rotate-half (Hugging Face) layout.
/// `x`: (B, H, T, Dh); `cos`, `sin`: (T, Dh/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(x.dtype())?.contiguous()?;
    let sin = sin.to_dtype(x.dtype())?.contiguous()?;
    let out = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &cos, &sin)?;
    custom_vjp::record1(x, out, move |_, g| rope_transpose(g, &cos, &sin))
}

/// The cotangent of `rope`'s input: a rotation's transpose rotates by the opposite angle.
pub fn rope_transpose(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(g.dtype())?.contiguous()?;
    let back = sin.to_dtype(g.dtype())?.neg()?;
    candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &back)
}

/// SiLU(gate) * up, the SwiGLU activation, recorded with `swiglu_vjp` as its backward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (g, u) = (gate.detach(), up.detach());
    let fused = on_cpu_f32(&[&g, &u], |x| {
        let (g, u) = (x[0], x[1]);
        let mut y = vec![0f32; g.len()];
        parallel::map_chunks(&mut y, ELEMENTS_PER_TASK, |c, y| {
            let range = c * ELEMENTS_PER_TASK..c * ELEMENTS_PER_TASK + y.len();
            vector::swiglu(Isa::best(), &g[range.clone()], &u[range], y)
        });
        y
    });
    let out = match fused {
        Some(y) => Tensor::from_vec(y?, g.shape(), g.device())?,
        None => (candle_nn::ops::silu(&g)? * &u)?,
    };
    custom_vjp::record2(gate, up, out, swiglu_vjp)
}

/// Cotangents of gate and up for `swiglu`'s output cotangent `g`: with s = sigmoid(gate),
/// d gate = g up s (1 + gate (1 - s)), d up = g gate s.
pub fn swiglu_vjp(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let fused = on_cpu_f32(&[gate, up, g], |x| {
        let (gate, up, g) = (x[0], x[1], x[2]);
        let mut d_gate = vec![0f32; gate.len()];
        let mut d_up = vec![0f32; gate.len()];
        parallel::for_each_chunks(
            [&mut d_gate, &mut d_up],
            ELEMENTS_PER_TASK,
            |c, [d_gate, d_up]| {
                let range = c * ELEMENTS_PER_TASK..c * ELEMENTS_PER_TASK + d_gate.len();
                let (x, u, g) = (&gate[range.clone()], &up[range.clone()], &g[range]);
                wide(|| {
                    for i in 0..d_gate.len() {
                        let (x, u, g) = (x[i], u[i], g[i]);
                        let e = exp(-x);
                        let s = 1.0 / (1.0 + e);
                        // 1 - s as e s: exact where 1 - s would cancel (large x).
                        let s_neg = if e.is_finite() { e * s } else { 1.0 };
                        d_up[i] = g * x * s;
                        d_gate[i] = g * u * s * (1.0 + x * s_neg);
                    }
                })
            },
        );
        (d_gate, d_up)
    });
    if let Some(grads) = fused {
        let (d_gate, d_up) = grads?;
        let shape = gate.shape();
        return Ok((
            Tensor::from_vec(d_gate, shape, gate.device())?,
            Tensor::from_vec(d_up, shape, gate.device())?,
        ));
    }
    let s = candle_nn::ops::sigmoid(gate)?;
    let grad_up = (g * (gate * &s)?)?;
    // 1 - s as sigmoid(-gate), which does not cancel for large gates.
    let slope = (s * (gate * candle_nn::ops::sigmoid(&gate.neg()?)?)?.affine(1.0, 1.0)?)?;
    let grad_gate = ((g * up)? * slope)?;
    Ok((grad_gate, grad_up))
}

/// `f` over the data of same-shaped contiguous f32 CPU tensors, or None for any other kind
/// (the caller then falls back to candle's ops). candle's own CPU unary ops run on one core.
pub(crate) fn on_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<Result<R>> {
    if !ts.iter().all(|t| t.shape() == ts[0].shape()) {
        return None;
    }
    with_cpu_f32(ts, f)
}

/// `f` over the data of contiguous f32 CPU tensors of any shapes, or None for any other kind.
pub(crate) fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<Result<R>> {
    let suitable =
        |t: &&Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !ts.iter().all(suitable) {
        return None;
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let (start, end) = layout.contiguous_offsets()?;
        match cpu.as_slice::<f32>() {
            Ok(data) => slices.push(&data[start..end]),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(f(&slices)))
}

/// max |a - b| over all elements, in f64 (for the kernels' tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Checks the backward of `op` (through sum(op(x) * w) for a fixed random w) against
    /// central finite differences in f64.
    /// `op`'s autograd gradient of sum(op(x) * w) against central finite differences.
    fn check_gradient(op: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        check_vjp(
            &op,
            |x, w| {
                let x = Var::from_tensor(x).unwrap();
                let grads = (op(x.as_tensor()).unwrap() * w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                grads.get(x.as_tensor()).expect("op has a backward").clone()
            },
            shape,
        );
    }

    /// `vjp(x, w)`, the claimed gradient of sum(op(x) * w) at x, against central finite
    /// differences.
    fn check_vjp(
        op: impl Fn(&Tensor) -> Result<Tensor>,
        vjp: impl Fn(&Tensor, &Tensor) -> Tensor,
        shape: &[usize],
    ) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, op(&x).unwrap().shape(), &dev).unwrap();
        let objective = |t: &Tensor| {
            (op(t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let analytic = vjp(&x, &w).flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for i in 0..flat.len() {
            let mut plus = flat.clone();
            plus[i] += eps;
            let mut minus = flat.clone();
            minus[i] -= eps;
            let t = |v: Vec<f64>| Tensor::from_vec(v, shape, &dev).unwrap();
            let numeric = (objective(&t(plus)) - objective(&t(minus))) / (2.0 * eps);
            assert!(
                (numeric - analytic[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "element {i}: finite difference {numeric}, backward {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let w = Tensor::randn(1f64, 0.1, 6, &Device::Cpu).unwrap();
        check_gradient(|x| rms_norm(x, &w, 1e-5), &[3, 6]);
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6), &Device::Cpu).unwrap();
        check_gradient(|w| rms_norm(&x, w, 1e-5), &[6]);
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let cos = Tensor::randn(0f64, 1.0, (4, 3), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (4, 3), &Device::Cpu).unwrap();
        check_gradient(|x| rope(x, &cos, &sin), &[1, 2, 4, 6]);
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let up = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu).unwrap();
        check_gradient(|x| swiglu(x, &up), &[3, 4]);
    }

    /// The fused f32 CPU kernels (several parallel chunks) against the f64 composite.
    #[test]
    fn fused_swiglu_kernels_match_the_f64_composite() {
        let dev = Device::Cpu;
        let shape = (3, ELEMENTS_PER_TASK + 77);
        let [gate, up, g] = [0, 1, 2].map(|_| Tensor::randn(0f32, 2.0, shape, &dev).unwrap());
        let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        // Within a few f32 roundings of the size of each element's terms (a relative bound
        // on the result itself cannot hold where the terms cancel to zero).
        let close = |got: &Tensor, want: &Tensor, scale: Tensor| {
            let err = (got.to_dtype(DType::F64).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap();
            let bound = ((scale * 1e-6).unwrap() + 1e-30).unwrap();
            let ratio = (err / bound).unwrap().max_all().unwrap();
            let ratio = ratio.to_scalar::<f64>().unwrap();
            assert!(ratio <= 1.0, "error {ratio}x the bound");
        };
        let (x, u, dy) = (
            wide(&gate).abs().unwrap(),
            wide(&up).abs().unwrap(),
            wide(&g).abs().unwrap(),
        );
        let want = swiglu(&wide(&gate), &wide(&up)).unwrap();
        close(&swiglu(&gate, &up).unwrap(), &want, (&x * &u).unwrap());
        let (d_gate, d_up) = swiglu_vjp(&gate, &up, &g).unwrap();
        let (want_gate, want_up) = swiglu_vjp(&wide(&gate), &wide(&up), &wide(&g)).unwrap();
        let gate_scale = ((&dy * &u).unwrap() * (&x + 1.0).unwrap()).unwrap();
        close(&d_gate, &want_gate, gate_scale);
        close(&d_up, &want_up, (&dy * &x).unwrap());
    }

    #[test]
    fn hand_written_swiglu_vjp_matches_finite_differences() {
        let other = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu).unwrap();
        let vjp_gate = |x: &Tensor, w: &Tensor| swiglu_vjp(x, &other, w).unwrap().0;
        check_vjp(|x| swiglu(x, &other), vjp_gate, &[3, 4]);
        let vjp_up = |x: &Tensor, w: &Tensor| swiglu_vjp(&other, x, w).unwrap().1;
        check_vjp(|x| swiglu(&other, x), vjp_up, &[3, 4]);
    }

    /// The fused f32 RMSNorm backward (several 16-row blocks) against the f64 composite.
    #[test]
    fn fused_rms_norm_vjp_matches_the_f64_composite() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 19, 24), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 19, 24), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 24, &dev).unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (dx, dw) = rms_norm_vjp(&x, &w, 1e-5, &g).unwrap();
        let (want_dx, want_dw) = rms_norm_vjp(&wide(&x), &wide(&w), 1e-5, &wide(&g)).unwrap();
        assert_eq!((dx.dims(), dw.dims()), (x.dims(), w.dims()));
        assert!(max_abs_diff(&dx, &want_dx) < 1e-5);
        assert!(max_abs_diff(&dw, &want_dw) < 1e-4);
    }

    /// The f64 reference normalisation computes what candle's fused f32 kernel computes.
    #[test]
    fn f64_rms_norm_matches_the_fused_kernel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let fused = rms_norm(&x, &w, 1e-5).unwrap();
        let reference = rms_norm(
            &x.to_dtype(DType::F64).unwrap(),
            &w.to_dtype(DType::F64).unwrap(),
            1e-5,
        )
        .unwrap();
        let diff = max_abs_diff(&fused, &reference);
        assert!(diff < 1e-5, "{diff}");
    }
}
