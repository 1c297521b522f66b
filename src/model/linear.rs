//! Weight matrices that are either dense tensors (trainable) or GGUF-quantized blocks
//! (inference only: CPU decoding is memory-bound, so Q4/Q8 weights decode faster).

use crate::model::matmul::matmul;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use std::sync::Arc;

/// A weight as a loader hands it over.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Dense(t) => t.dims().to_vec(),
            Self::Quantized(q) => q.shape().dims().to_vec(),
        }
    }

    /// The weight as a dense tensor (dequantising if needed).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }
}

/// A low-rank update W + scale * B A (Hu et al. 2021, "LoRA"); B starts at zero so the
/// adapted layer starts equal to the original.
#[derive(Debug, Clone)]
pub struct Lora {
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank)
    pub b: Tensor,
    /// alpha / rank.
    pub scale: f64,
}

/// y = x W^T (+ b) (+ LoRA), for x of shape (N, in).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    quantized: Option<Arc<QMatMul>>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let quantized = match &weight {
            Weight::Quantized(q) => Some(Arc::new(QMatMul::from_arc(q.clone())?)),
            Weight::Dense(_) => None,
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
            quantized,
        })
    }

    /// Applies the layer; the output has the dtype of `x`. Dense weights are cast to `x`'s
    /// dtype, so f32 master weights serve a bf16 forward (and receive f32 gradients).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, &self.quantized) {
            (_, Some(q)) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
            (Weight::Dense(w), None) => matmul(x, &w.to_dtype(x.dtype())?.t()?)?,
            (Weight::Quantized(_), None) => candle_core::bail!("quantized weight without a kernel"),
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let low = matmul(
                    &matmul(x, &l.a.to_dtype(x.dtype())?.t()?)?,
                    &l.b.to_dtype(x.dtype())?.t()?,
                )?;
                y + (low * l.scale)?
            }
            None => Ok(y),
        }
    }

    /// Attaches a rank-`rank` adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) from `seed`, B = 0.
    pub fn add_lora(&mut self, rank: usize, alpha: f64, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let dims = self.weight.shape();
        let (out, inp) = (dims[0], dims[1]);
        let device = match &self.weight {
            Weight::Dense(w) => w.device().clone(),
            Weight::Quantized(q) => q.device(),
        };
        let bound = 1.0 / (inp as f32).sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..rank * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        self.lora = Some(Lora {
            a: Tensor::from_vec(a, (rank, inp), &device)?,
            b: Tensor::zeros((out, rank), DType::F32, &device)?,
            scale: alpha / rank as f64,
        });
        Ok(())
    }

    /// Folds the adapter into the dense weight (W += scale * B A) and drops it.
    pub fn merge_lora(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let dtype = match &self.weight {
                Weight::Dense(w) => w.dtype(),
                Weight::Quantized(_) => DType::F32,
            };
            let w = self.weight.to_dense(DType::F32)?;
            let delta =
                (l.b.to_dtype(DType::F32)?
                    .matmul(&l.a.to_dtype(DType::F32)?)?
                    * l.scale)?;
            *self = Self::new(
                Weight::Dense((w + delta)?.to_dtype(dtype)?),
                self.bias.clone(),
            )?;
        }
        Ok(())
    }

    /// Replaces a quantized weight by its dequantised tensor (training and saving need dense).
    pub fn densify(&mut self, dtype: DType) -> Result<()> {
        if let Weight::Quantized(_) = self.weight {
            let lora = self.lora.take();
            *self = Self::new(
                Weight::Dense(self.weight.to_dense(dtype)?),
                self.bias.clone(),
            )?;
            self.lora = lora;
        }
        Ok(())
    }

    /// Mutable access to the dense tensors, for turning them into trainable variables.
    pub fn dense_tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut out = Vec::new();
        if let Weight::Dense(w) = &mut self.weight {
            out.push(("weight", w));
        }
        if let Some(b) = &mut self.bias {
            out.push(("bias", b));
        }
        if let Some(l) = &mut self.lora {
            out.push(("lora_a", &mut l.a));
            out.push(("lora_b", &mut l.b));
        }
        out
    }
}

/// Token embedding table, dense or quantized (GGUF keeps it in Q8_0).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Weight,
}

impl Embedding {
    /// ids: (N,) u32 -> (N, d), in the table's dtype (f32 when quantized).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => w.index_select(ids, 0),
            Weight::Quantized(q) => q.embedding(ids)?.to_dtype(DType::F32),
        }
    }
}
