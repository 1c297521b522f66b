//! Per-position tables on the model's device: rotary embedding angles (rotate-half layout; GGUF
//! Q/K rows are un-permuted at load) and the position indices causal masks are built from.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor, // (max_positions, head_dim/2)
    sin: Tensor,
    positions: Tensor, // 0..max_positions, u32
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
            positions: Tensor::arange(0u32, max_positions as u32, device)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    fn check(&self, end: usize) -> Result<()> {
        if end > self.max_positions() {
            candle_core::bail!(
                "position {end} beyond the context of {} tokens",
                self.max_positions()
            );
        }
        Ok(())
    }

    /// (cos, sin) rows for positions start..start+len, contiguous.
    pub fn slice(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.check(start + len)?;
        Ok((
            self.cos.narrow(0, start, len)?.contiguous()?,
            self.sin.narrow(0, start, len)?.contiguous()?,
        ))
    }

    /// (seq, keys) additive mask: query i, at position start+i, sees keys 0..=start+i.
    /// Built from device-resident indices: a mask made on the host would cost a host-to-device
    /// copy per layer, and such a copy from pageable memory stalls a GPU stream.
    pub fn causal_mask(
        &self,
        seq: usize,
        keys: usize,
        start: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        self.check((start + seq).max(keys))?;
        let queries = self.positions.narrow(0, start, seq)?.unsqueeze(1)?;
        let hidden = self
            .positions
            .narrow(0, 0, keys)?
            .unsqueeze(0)?
            .broadcast_gt(&queries)?;
        let open = Tensor::zeros((seq, keys), dtype, self.positions.device())?;
        hidden.where_cond(&(&open + f64::NEG_INFINITY)?, &open)
    }
}
