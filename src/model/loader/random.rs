//! Randomly initialised weights through the same loading path as real checkpoints: for
//! plumbing tests and synthetic benchmarks (GPT-2-style init: N(0, 0.02), norms at 1).

use crate::model::linear::Weight;
use crate::model::loader::{WeightFormat, WeightSource};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub struct RandomSource {
    pub seed: u64,
    /// Whether the model has a separate `lm_head.weight`.
    pub separate_head: bool,
}

impl WeightSource for RandomSource {
    fn path(&self) -> &Path {
        Path::new("<random>")
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" || self.separate_head
    }

    fn load(&self, name: &str, format: WeightFormat, device: &Device) -> Result<Weight> {
        Err(anyhow::anyhow!(
            "random weights need a shape: `{name}` ({format:?} on {device:?})"
        ))
    }

    fn load_shaped(
        &self,
        name: &str,
        shape: &[usize],
        format: WeightFormat,
        device: &Device,
    ) -> Result<Weight> {
        let dtype = if shape.len() == 1 {
            DType::F32
        } else {
            format.dense_dtype()
        };
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else {
            // A per-name seed keeps models reproducible whatever the loading order.
            let seed = name.bytes().fold(self.seed, |h, b| {
                h.wrapping_mul(1_099_511_628_211).wrapping_add(b as u64)
            });
            Tensor::from_vec(normal(seed, shape.iter().product(), 0.02), shape, device)?
        };
        Ok(Weight::Dense(t.to_dtype(dtype)?))
    }
}

/// `n` samples of N(0, std^2) by Box-Muller from a seeded generator.
fn normal(seed: u64, n: usize, std: f32) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}
