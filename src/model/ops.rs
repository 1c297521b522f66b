//! Kernels with two implementations: candle's fused ones for inference, and composites of
//! differentiable ops for training.
//!
//! candle's fused `rms_norm` and `rope` record no backward: a graph through
//! them silently yields zero gradients. The choice is explicit (not inferred from `track_op`)
//! because the reversible backward recomputes each block and must get bit-identical results to
//! the forward, so both passes must run the same kernels.

use candle_core::{DType, Result, Tensor, D};

/// Which implementation the ops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's fused kernels: fastest, no backward.
    #[default]
    Fused,
    /// Composites of ops with a backward: used by every training forward and recomputation.
    Differentiable,
}

/// RMSNorm over the last dimension, normalised in f32 (f64 for f64 inputs).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, kernels: Kernels) -> Result<Tensor> {
    // candle has no fused f64 kernel; f64 runs are reference computations anyway.
    let kernels = if x.dtype() == DType::F64 {
        Kernels::Differentiable
    } else {
        kernels
    };
    match kernels {
        Kernels::Fused => {
            let weight = weight.to_dtype(x.dtype())?;
            candle_nn::ops::rms_norm(&x.contiguous()?, &weight, eps as f32)
        }
        Kernels::Differentiable => {
            let dtype = x.dtype();
            let work = if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let xw = x.to_dtype(work)?;
            let mean_square = xw.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = xw.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
            normed
                .broadcast_mul(&weight.to_dtype(work)?)?
                .to_dtype(dtype)
        }
    }
}

/// Softmax over the last dimension (candle's fused kernel: training differentiates attention by
/// hand, see `attention`, so no graph ever runs through it).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// Rotary embedding in the rotate-half (Hugging Face) layout.
/// `x`: (B, H, T, Dh); `cos`, `sin`: (T, Dh/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    match kernels {
        Kernels::Fused => {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
        }
        Kernels::Differentiable => {
            let half = x.dim(D::Minus1)? / 2;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let (cos, sin) = (
                cos.unsqueeze(0)?.unsqueeze(0)?,
                sin.unsqueeze(0)?.unsqueeze(0)?,
            );
            let first = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let second = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[&first, &second], D::Minus1)
        }
    }
}

/// SiLU(gate) * up, the SwiGLU activation. candle's `silu` has a backward, so one form serves both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Checks the backward of `op` (through sum(op(x) * w) for a fixed random w) against
    /// central finite differences in f64.
    fn check_gradient(op: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, op(x.as_tensor()).unwrap().shape(), &dev).unwrap();
        let objective = |t: &Tensor| {
            (op(t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (op(x.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads
            .get(x.as_tensor())
            .expect("op has a backward")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let flat = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
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
        check_gradient(|x| rms_norm(x, &w, 1e-5, Kernels::Differentiable), &[3, 6]);
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let cos = Tensor::randn(0f64, 1.0, (4, 3), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (4, 3), &Device::Cpu).unwrap();
        check_gradient(
            |x| rope(x, &cos, &sin, Kernels::Differentiable),
            &[1, 2, 4, 6],
        );
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let up = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu).unwrap();
        check_gradient(|x| swiglu(x, &up), &[3, 4]);
    }

    /// The composites compute what candle's fused kernels compute.
    #[test]
    fn composites_match_fused_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let (cos, sin) = (
            Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap(),
        );
        let pairs = [
            (
                rms_norm(&x, &w, 1e-5, Kernels::Fused).unwrap(),
                rms_norm(&x, &w, 1e-5, Kernels::Differentiable).unwrap(),
            ),
            (
                rope(&x, &cos, &sin, Kernels::Fused).unwrap(),
                rope(&x, &cos, &sin, Kernels::Differentiable).unwrap(),
            ),
        ];
        for (fused, composite) in pairs {
            let diff = (fused - composite)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }
}
