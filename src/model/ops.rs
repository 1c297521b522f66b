//! The block's elementwise kernels: candle's fused ones, with hand-written backwards.
//!
//! candle's fused `rms_norm` and `rope` record no backward: a graph through them would silently
//! yield zero gradients. Here each kernel runs fused (no graph), and when an input is part of a
//! graph its output is recorded with its vector-Jacobian product (`custom_vjp`). Inference and
//! training, the forward and the reversible recomputation, all run the same kernels, so a
//! recomputed block is bit-identical to its forward.

use crate::model::custom_vjp;
use candle_core::{DType, Result, Tensor, D};

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

/// SiLU(gate) * up, the SwiGLU activation. candle's `silu` has a backward, so one form serves both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// Cotangents of gate and up for `swiglu`'s output cotangent `g`: with s = sigmoid(gate),
/// d gate = g up s (1 + gate (1 - s)), d up = g gate s.
pub fn swiglu_vjp(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = candle_nn::ops::sigmoid(gate)?;
    let silu = (gate * &s)?;
    let grad_up = (g * &silu)?;
    // s (1 + gate (1 - s)) = s + silu - silu s.
    let slope = ((&s + &silu)? - (silu * &s)?)?;
    let grad_gate = ((g * up)? * slope)?;
    Ok((grad_gate, grad_up))
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

    #[test]
    fn hand_written_swiglu_vjp_matches_finite_differences() {
        let other = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu).unwrap();
        let vjp_gate = |x: &Tensor, w: &Tensor| swiglu_vjp(x, &other, w).unwrap().0;
        check_vjp(|x| swiglu(x, &other), vjp_gate, &[3, 4]);
        let vjp_up = |x: &Tensor, w: &Tensor| swiglu_vjp(&other, x, w).unwrap().1;
        check_vjp(|x| swiglu(&other, x), vjp_up, &[3, 4]);
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
