//! Rotary position embedding tables (rotate-half layout; GGUF Q/K rows are un-permuted at load).

use candle_core::{Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor, // (max_positions, head_dim/2)
    sin: Tensor,
}

impl RopeTables {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // Angles in f64 so long positions keep their precision before the f32 cast.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// (cos, sin) rows for positions start..start+len, contiguous.
    pub fn slice(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        if start + len > self.max_positions() {
            candle_core::bail!(
                "position {} beyond the context of {} tokens",
                start + len,
                self.max_positions()
            );
        }
        Ok((
            self.cos.narrow(0, start, len)?.contiguous()?,
            self.sin.narrow(0, start, len)?.contiguous()?,
        ))
    }
}
