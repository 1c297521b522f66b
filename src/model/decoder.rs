//! The whole decoder: embedding, the block stack coupled by a reversible scheme, final norm and
//! LM head. The stack walk here is the plain forward (inference, scoring, invertibility checks);
//! the trainer drives the same blocks and step rules with its own backward strategies.

use crate::kernels::team::Team;
use crate::model::block::{Block, BlockCtx, Layout, RaggedSeq};
use crate::model::config::ModelConfig;
use crate::model::kv_cache::KvCache;
use crate::model::linear::{Embedding, Linear, Weight};
use crate::model::ops;
use crate::model::packed_decoder::PackedDecoder;
use crate::model::reversible::{self, ReversibleConfig, SchemeKind};
use crate::model::rope::RopeTables;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// The two states a scheme carries between layers: (p_{j-1}, p_j), or (q, p) for hamiltonian.
/// Euler carries only `last`.
#[derive(Debug, Clone)]
pub struct States {
    pub other: Tensor,
    pub last: Tensor,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub reversible: ReversibleConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// None when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    pub rope: RopeTables,
    pub compute_dtype: DType,
    /// Residual streams: f32, or f64 for reference computations.
    pub residual_dtype: DType,
    pub device: Device,
    /// The CPU decode path's copy of the weights, when [`Model::pack_for_decoding`] made one;
    /// every method that hands out or changes weights drops it.
    pub packed: Option<Arc<PackedDecoder>>,
}

/// Which positions of a step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Each sequence's last new token: what sampling needs.
    Last,
    /// Every new token, in input order (scoring and evaluation).
    Every,
}

/// One sequence's new tokens for a batched inference step, with its cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

impl Model {
    pub fn ctx(&self) -> BlockCtx<'_> {
        BlockCtx {
            rope: &self.rope,
            compute_dtype: self.compute_dtype,
            residual_dtype: self.residual_dtype,
        }
    }

    /// ids: (N,) -> (N, d) in the residual dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens
            .forward(ids)?
            .to_dtype(self.residual_dtype)
    }

    /// The initial pair of states from the embedding.
    pub fn seed(&self, e: &Tensor, layout: &mut Layout<'_>) -> Result<States> {
        let states = States {
            other: e.clone(),
            last: e.clone(),
        };
        if self.reversible.first_scheme_layer() == 1 {
            let f = self.layers[0].f(e, layout, &self.ctx())?;
            return Ok(States {
                other: e.clone(),
                last: (e + f)?,
            });
        }
        Ok(states)
    }

    /// Layer `j`'s forward step.
    pub fn step(&self, j: usize, s: &States, layout: &mut Layout<'_>) -> Result<States> {
        let (block, ctx) = (&self.layers[j], self.ctx());
        match self.reversible.two_step(j) {
            Some(coef) => {
                let f = block.f(&s.last, layout, &ctx)?;
                Ok(States {
                    other: s.last.clone(),
                    last: coef.forward(&s.other, &s.last, &f)?,
                })
            }
            None => {
                let (q, p) = reversible::hamiltonian_forward(
                    self.reversible.h,
                    &s.other,
                    &s.last,
                    |p| block.attention_branch(p, layout, &ctx),
                    |q| block.mlp_branch(q, &ctx),
                )?;
                Ok(States { other: q, last: p })
            }
        }
    }

    /// Layer `j`'s inverse step: rebuilds the states below it. Only for uniform layouts (a KV
    /// cache cannot be un-appended).
    pub fn inverse_step(&self, j: usize, s: &States, layout: &mut Layout<'_>) -> Result<States> {
        let (block, ctx) = (&self.layers[j], self.ctx());
        match self.reversible.two_step(j) {
            Some(coef) => {
                let f = block.f(&s.other, layout, &ctx)?;
                Ok(States {
                    other: coef.inverse(&s.other, &s.last, &f)?,
                    last: s.other.clone(),
                })
            }
            None => {
                let (q, p) = reversible::hamiltonian_inverse(
                    self.reversible.h,
                    &s.other,
                    &s.last,
                    |p| block.attention_branch(p, layout, &ctx),
                    |q| block.mlp_branch(q, &ctx),
                )?;
                Ok(States { other: q, last: p })
            }
        }
    }

    /// Runs the stack from the embedding; returns the top pair of states.
    pub fn run_stack(&self, e: &Tensor, layout: &mut Layout<'_>) -> Result<States> {
        let mut s = self.seed(e, layout)?;
        for j in self.reversible.first_scheme_layer()..self.layers.len() {
            s = self.step(j, &s, layout)?;
        }
        Ok(s)
    }

    /// The read-out state of the top pair.
    pub fn read_out(&self, s: &States) -> Result<Tensor> {
        if self.reversible.scheme == SchemeKind::Euler {
            return Ok(s.last.clone());
        }
        reversible::read_out(self.reversible.readout, &s.other, &s.last)
    }

    /// The final RMSNorm in the compute dtype: the LM head's input.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?.to_dtype(self.compute_dtype)
    }

    /// The LM head's matrix (vocab, d), the tied embedding when there is no separate head,
    /// when it is a plain dense matrix (no bias, adapter or quantization), as training needs.
    pub fn dense_head(&self) -> Option<&Tensor> {
        let weight = match &self.lm_head {
            Some(head) if head.bias.is_some() || head.lora.is_some() => return None,
            Some(head) => &head.weight,
            None => &self.embed_tokens.weight,
        };
        match weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }

    /// Final norm + LM head: (N, d) -> (N, vocab) in the residual dtype.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = self.final_norm(hidden)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => Linear::new(self.embed_tokens.weight.clone(), None)?.forward(&x)?,
        };
        logits.to_dtype(self.residual_dtype)
    }

    /// Logits at every position of `batch` equal-length sequences: ids (B, T) -> (B, T, vocab).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let e = self.embed(&ids.flatten_all()?)?;
        let mut layout = Layout::Uniform { batch, seq };
        let s = self.run_stack(&e, &mut layout)?;
        self.logits(&self.read_out(&s)?)?.reshape((batch, seq, ()))
    }

    /// One batched inference step over sequences of any lengths (prefill, decode, or a mix):
    /// appends each sequence's tokens to its cache and returns the logits after each
    /// sequence's last token, (S, vocab).
    pub fn forward_step(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        self.forward_step_rows(seqs, LogitRows::Last)
    }

    /// [`Model::forward_step`] with logits at the chosen rows.
    pub fn forward_step_rows(&self, seqs: &mut [SeqInput<'_>], rows: LogitRows) -> Result<Tensor> {
        self.check_step(seqs)?;
        match &self.packed {
            Some(packed) => packed.forward_step(seqs, &self.reversible, rows, Team::global()),
            None => self.forward_step_tensors(seqs, rows),
        }
    }

    /// Repacks the weights for the CPU decode path, which [`Model::forward_step`] then uses;
    /// returns whether this model can run on it (CPU, f32 compute, adapters merged).
    pub fn pack_for_decoding(&mut self) -> Result<bool> {
        self.packed = PackedDecoder::build(self)?.map(Arc::new);
        Ok(self.packed.is_some())
    }

    /// What either path of a step needs of its inputs: new tokens in every sequence, within the
    /// context and the vocabulary.
    fn check_step(&self, seqs: &[SeqInput<'_>]) -> Result<()> {
        for s in seqs {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            if s.cache.len() + s.tokens.len() > self.rope.max_positions() {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the context of {}",
                    s.cache.len() + s.tokens.len(),
                    self.rope.max_positions()
                );
            }
            if s.tokens
                .iter()
                .any(|&t| t as usize >= self.config.vocab_size)
            {
                candle_core::bail!(
                    "token id out of the vocabulary of {}",
                    self.config.vocab_size
                );
            }
        }
        Ok(())
    }

    /// [`Model::forward_step`] through the tensor ops (any device and dtype), for inputs
    /// [`Model::forward_step_rows`] has checked.
    pub fn forward_step_tensors(
        &self,
        seqs: &mut [SeqInput<'_>],
        rows: LogitRows,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut last_rows = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            ids.extend_from_slice(s.tokens);
            last_rows.push((ids.len() - 1) as u32);
        }
        let n = ids.len();
        let e = self.embed(&Tensor::from_vec(ids, n, &self.device)?)?;
        let mut s = {
            let mut layout = ragged(seqs, 0);
            self.seed(&e, &mut layout)?
        };
        for j in self.reversible.first_scheme_layer()..self.layers.len() {
            let mut layout = ragged(seqs, j);
            s = self.step(j, &s, &mut layout)?;
        }
        let out = self.read_out(&s)?;
        match rows {
            LogitRows::Every => self.logits(&out),
            LogitRows::Last => {
                let last = Tensor::from_vec(last_rows, seqs.len(), &self.device)?;
                self.logits(&out.index_select(&last, 0)?)
            }
        }
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let d = c.hidden_size;
        let attn = d * c.num_attention_heads * c.head_dim() * 2 + d * c.kv_dim() * 2;
        let bias = if c.attention_bias {
            c.num_attention_heads * c.head_dim() + 2 * c.kv_dim()
        } else {
            0
        };
        let per_layer = attn + bias + 3 * d * c.intermediate_size + 2 * d;
        let head = if self.lm_head.is_some() {
            c.vocab_size * d
        } else {
            0
        };
        c.vocab_size * d + c.num_hidden_layers * per_layer + d + head
    }

    /// Converts every weight to `dtype` for computing entirely in it (f64 reference checks).
    pub fn to_precision(&mut self, dtype: DType) -> Result<()> {
        self.packed = None;
        self.densify()?;
        for (_, t) in self.parameters_mut() {
            *t = t.to_dtype(dtype)?;
        }
        self.compute_dtype = dtype;
        self.residual_dtype = dtype;
        Ok(())
    }

    /// The projection matrices of every block, named `self_attn.q_proj` etc.
    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        self.layers
            .iter_mut()
            .flat_map(Block::projections_mut)
            .collect()
    }

    /// Dequantises every quantized weight to f32.
    pub fn densify(&mut self) -> Result<()> {
        self.packed = None;
        if let Weight::Quantized(_) = self.embed_tokens.weight {
            self.embed_tokens.weight =
                Weight::Dense(self.embed_tokens.weight.to_dense(DType::F32)?);
        }
        for (_, lin) in self.projections_mut() {
            lin.densify(DType::F32)?;
        }
        if let Some(head) = &mut self.lm_head {
            head.densify(DType::F32)?;
        }
        Ok(())
    }

    /// Attaches LoRA adapters to the projections whose name contains one of `targets`
    /// (e.g. `q_proj`, `v_proj`); returns how many were attached.
    pub fn add_lora(
        &mut self,
        rank: usize,
        alpha: f64,
        targets: &[String],
        seed: u64,
    ) -> Result<usize> {
        let mut n = 0;
        self.packed = None;
        for (i, (name, lin)) in self.projections_mut().into_iter().enumerate() {
            if targets.iter().any(|t| name.contains(t.as_str())) {
                lin.add_lora(rank, alpha, seed.wrapping_add(i as u64))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Folds every LoRA adapter into its weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.packed = None;
        for (_, lin) in self.projections_mut() {
            lin.merge_lora()?;
        }
        Ok(())
    }

    /// Named dense parameters with HF names, for training and saving.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.packed = None;
        let mut out: Vec<(String, &mut Tensor)> = Vec::new();
        if let Weight::Dense(w) = &mut self.embed_tokens.weight {
            out.push(("model.embed_tokens.weight".into(), w));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, t) in layer.parameters_mut() {
                out.push((format!("model.layers.{i}.{name}"), t));
            }
        }
        out.push(("model.norm.weight".into(), &mut self.norm));
        if let Some(head) = &mut self.lm_head {
            for (kind, t) in head.dense_tensors_mut() {
                out.push((format!("lm_head.{kind}"), t));
            }
        }
        out
    }
}

/// The ragged layout of layer `j` over the batch's caches.
fn ragged<'a>(seqs: &'a mut [SeqInput<'_>], j: usize) -> Layout<'a> {
    Layout::Ragged(
        seqs.iter_mut()
            .map(|s| RaggedSeq {
                len: s.tokens.len(),
                cache: &mut s.cache.layers[j],
            })
            .collect(),
    )
}
