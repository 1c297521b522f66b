//! Gradient accumulation across the many local backward passes of one step.

use crate::kernels::vector_math::{sum_squares_f64, wide};
use crate::model::ops::on_cpu_f32;
use crate::model::parallel::{self, ELEMENTS_PER_TASK};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// One f32 gradient per trainable variable, summed over local backward passes.
pub struct Grads {
    pub grads: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn new(n: usize) -> Self {
        Self {
            grads: vec![None; n],
        }
    }

    /// Adds the gradients `store` holds for `vars`.
    pub fn absorb(&mut self, store: &GradStore, vars: &[Var]) -> Result<()> {
        for (slot, var) in self.grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                // candle records ops on gradients computed from variables; detaching drops that
                // history, which would otherwise keep every local graph alive.
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Adds `g` to the gradient of variable `index`.
    pub fn add_at(&mut self, index: usize, g: Tensor) -> Result<()> {
        let slot = &mut self.grads[index];
        *slot = Some(match slot.take() {
            Some(acc) => (acc + g)?,
            None => g,
        });
        Ok(())
    }

    /// Adds another accumulator (gradient accumulation over micro-batches).
    pub fn add(&mut self, other: Grads) -> Result<()> {
        for (slot, g) in self.grads.iter_mut().zip(other.grads) {
            if let Some(g) = g {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm, accumulated in f64 on the gradients' device and read once.
    pub fn global_norm(&self) -> Result<f64> {
        let mut host = 0f64;
        let mut device: Option<Tensor> = None;
        for g in self.grads.iter().flatten() {
            if let Some(squares) = on_cpu_f32(&[g], |t| sum_of_squares(t[0])) {
                host += squares?;
                continue;
            }
            let squares = g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?;
            device = Some(match device {
                Some(acc) => (acc + squares)?,
                None => squares,
            });
        }
        let device = device.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?;
        Ok((host + device).sqrt())
    }
}

/// Sum of x^2 in f64, in parallel; the chunks' sums are added in order, so the result does not
/// depend on the thread count.
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut partial = vec![0f64; x.len().div_ceil(ELEMENTS_PER_TASK)];
    parallel::map_chunks(&mut partial, 1, |c, out| {
        let chunk = &x[c * ELEMENTS_PER_TASK..((c + 1) * ELEMENTS_PER_TASK).min(x.len())];
        out[0] = wide(|| sum_squares_f64(chunk));
    });
    partial.iter().sum()
}

/// The gradient of `t` in `store` (detached from the backward's own graph), or zeros when
/// nothing flowed into it.
pub fn grad_or_zeros(store: &GradStore, t: &Tensor) -> Result<Tensor> {
    match store.get(t) {
        Some(g) => Ok(g.detach()),
        None => t.zeros_like(),
    }
}
