//! AdamW (decoupled weight decay, bias-corrected f32 moments), global-norm clipping, and a
//! linear-warmup + cosine-decay learning-rate schedule.

use crate::train::grads::Grads;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// Warmup then cosine decay to `min_ratio * peak`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_ratio: f64,
}

impl Schedule {
    /// Multiplier of the peak rate at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        self.min_ratio
            + (1.0 - self.min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// First and second moments, f32 (f64 for f64 parameters), one pair per variable.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Updates taken so far (for bias correction).
    pub step: usize,
}

/// What one update did, for logs and events.
pub struct UpdateStats {
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &[Var]) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| {
                let dtype = if v.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let z = Tensor::zeros(v.shape(), dtype, v.device())?;
                Ok((z.clone(), z))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            moments,
            step: 0,
        })
    }

    /// Clips `grads` to the configured global norm and applies one AdamW update with rate
    /// `lr`. Parameters without a gradient are left untouched.
    pub fn update(&mut self, vars: &[Var], grads: &mut Grads, lr: f64) -> Result<UpdateStats> {
        let grad_norm = grads.global_norm()?;
        if !grad_norm.is_finite() {
            anyhow::bail!("gradient norm is {grad_norm}: refusing to update the weights");
        }
        let c = &self.config;
        if c.max_grad_norm > 0.0 && grad_norm > c.max_grad_norm {
            grads.scale(c.max_grad_norm / grad_norm)?;
        }
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for ((var, g), (m, v)) in vars.iter().zip(&grads.grads).zip(self.moments.iter_mut()) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(m.dtype())?;
            *m = ((m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?).detach();
            *v = ((v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?).detach();
            let m_hat = m.affine(1.0 / bc1, 0.0)?;
            let v_hat = v.affine(1.0 / bc2, 0.0)?;
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let w = var.as_tensor().detach();
            // Decoupled weight decay (Loshchilov & Hutter): shrink the weight, then the Adam step.
            let updated = ((w.affine(1.0 - lr * c.weight_decay, 0.0)?
                - step.affine(lr, 0.0)?.to_dtype(w.dtype())?)?)
            .detach();
            var.set(&updated)?;
        }
        Ok(UpdateStats { grad_norm, lr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            warmup_steps: 10,
            total_steps: 110,
            min_ratio: 0.1,
        };
        assert!((s.factor(0) - 0.1).abs() < 1e-12);
        assert!((s.factor(9) - 1.0).abs() < 1e-12);
        assert!((s.factor(60) - 0.55).abs() < 1e-12);
        assert!((s.factor(500) - 0.1).abs() < 1e-12);
    }

    /// Two AdamW steps against the update rule computed by hand in f64.
    #[test]
    fn adamw_matches_reference_rule() {
        let dev = Device::Cpu;
        let var = Var::from_vec(vec![1.0f64, -2.0], 2, &dev).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 0.0,
        };
        let mut opt = AdamW::new(config.clone(), std::slice::from_ref(&var)).unwrap();
        let gs = [[0.5f64, -1.0], [0.25, 2.0]];
        let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let mut grads = Grads {
                grads: vec![Some(Tensor::new(&g[..], &dev).unwrap())],
            };
            opt.update(std::slice::from_ref(&var), &mut grads, config.lr)
                .unwrap();
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.99f64.powi(t as i32 + 1));
                w[i] = w[i] * (1.0 - 0.1 * 0.01) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..2 {
            assert!((got[i] - w[i]).abs() < 1e-12, "{got:?} vs {w:?}");
        }
    }
}
