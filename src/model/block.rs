//! The decoder block, written once as the function f of the residual state:
//!
//! ```text
//! f(p) = Attn(N1 p) + MLP(N2 (p + Attn(N1 p)))
//! ```
//!
//! i.e. the whole pre-norm block without its outer skip. Every scheme in `reversible` couples
//! these same blocks; hamiltonian uses the two halves separately.

use crate::model::attention;
use crate::model::config::ModelConfig;
use crate::model::kv_cache::LayerKv;
use crate::model::linear::Linear;
use crate::model::ops;
use crate::model::rope::RopeTables;
use candle_core::{DType, Result, Tensor};

/// How the N token rows of a forward pass are grouped into sequences.
pub enum Layout<'a> {
    /// `batch` sequences of `seq` tokens each, from position 0, no cache (training, scoring).
    Uniform { batch: usize, seq: usize },
    /// Sequences of any lengths, each continuing its own cache (prefill and decode).
    Ragged(Vec<RaggedSeq<'a>>),
}

/// One sequence's new tokens in a ragged pass, with its layer cache.
pub struct RaggedSeq<'a> {
    pub len: usize,
    pub cache: &'a mut LayerKv,
}

/// Settings every block call shares.
#[derive(Clone, Copy)]
pub struct BlockCtx<'a> {
    pub rope: &'a RopeTables,
    /// dtype of the matmuls inside f.
    pub compute_dtype: DType,
    /// dtype of the residual states and of softmax/norm reductions: f32 (f64 for reference
    /// gradient checks), whatever the compute dtype.
    pub residual_dtype: DType,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// x: (N, d) normalised rows -> (N, d).
    pub fn forward(
        &self,
        x: &Tensor,
        layout: &mut Layout<'_>,
        ctx: &BlockCtx<'_>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?; // (N, H*Dh), (N, KvH*Dh), (N, KvH*Dh)
        let out = match layout {
            Layout::Uniform { batch, seq } => {
                self.attend(&q, &k, &v, *batch, *seq, 0, None, ctx)?
            }
            Layout::Ragged(seqs) => {
                let mut outs = Vec::with_capacity(seqs.len());
                let mut offset = 0;
                for s in seqs.iter_mut() {
                    let (q, k, v) = (
                        q.narrow(0, offset, s.len)?,
                        k.narrow(0, offset, s.len)?,
                        v.narrow(0, offset, s.len)?,
                    );
                    let start = s.cache.len();
                    outs.push(self.attend(
                        &q,
                        &k,
                        &v,
                        1,
                        s.len,
                        start,
                        Some(&mut *s.cache),
                        ctx,
                    )?);
                    offset += s.len;
                }
                Tensor::cat(&outs, 0)?
            }
        };
        self.o_proj.forward(&out)
    }

    /// The query, key and value projections of normalised rows x.
    pub fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        ))
    }

    /// Causal attention for `batch` sequences of `seq` new tokens starting at position `start`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: usize,
        seq: usize,
        start: usize,
        cache: Option<&mut LayerKv>,
        ctx: &BlockCtx<'_>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.split_heads(q, k, v, batch, seq, start, ctx)?;
        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = cache.append(&k.squeeze(0)?, &v.squeeze(0)?)?;
                (k.unsqueeze(0)?, v.unsqueeze(0)?)
            }
            None => (k, v),
        };
        let out = self.kernel(&q, seq, start, ctx).apply(&q, &k, &v)?;
        self.merge_heads(&out, batch, seq)
    }

    /// Projected rows (N, heads*Dh) to rotated heads: q as (B, KvH, rep*T, Dh), the `rep` query
    /// heads sharing a KV head stacked along the rows (grouped-query attention without copying
    /// K/V); k and v as (B, KvH, T, Dh).
    #[allow(clippy::too_many_arguments)]
    pub fn split_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: usize,
        seq: usize,
        start: usize,
        ctx: &BlockCtx<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, kvh, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: &Tensor, n: usize| {
            t.reshape((batch, seq, n, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = ctx.rope.slice(start, seq)?;
        let q = ops::rope(&heads(q, h)?, &cos, &sin)?;
        let k = ops::rope(&heads(k, kvh)?, &cos, &sin)?;
        let q = q.reshape((batch, kvh, (h / kvh) * seq, dh))?;
        Ok((q, k, heads(v, kvh)?))
    }

    /// The attention kernel for stacked query rows `q` at positions `start..start+seq`.
    pub fn kernel(
        &self,
        q: &Tensor,
        seq: usize,
        start: usize,
        ctx: &BlockCtx<'_>,
    ) -> attention::CausalAttention {
        let q_rows = q.dims().get(2).copied().unwrap_or(0);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        attention::CausalAttention::new(q_rows, seq, start, scale, ctx.residual_dtype, ctx.rope)
    }

    /// Stacked attention outputs (B, KvH, rep*T, Dh) back to rows (N, H*Dh).
    pub fn merge_heads(&self, out: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
        let (h, dh) = (self.num_heads, self.head_dim);
        out.reshape((batch, h, seq, dh))?
            .transpose(1, 2)?
            .reshape((batch * seq, h * dh))
    }
}

/// Rows per tile of the MLP branch (its intermediate is ~2.75x wider than the model).
const MLP_ROWS: usize = 512;

/// The MLP branch's row tiles of `rows` rows, (first row, rows): the forward and the training
/// backward walk the same ones, which keeps them bit-identical.
pub fn mlp_tiles(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(MLP_ROWS)
        .map(move |r0| (r0, MLP_ROWS.min(rows - r0)))
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = self.gate_and_up(x)?;
        self.down_proj.forward(&ops::swiglu(&gate, &up)?)
    }

    /// The gate and up projections of normalised rows x.
    pub fn gate_and_up(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.gate_proj.forward(x)?, self.up_proj.forward(x)?))
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub rms_norm_eps: f64,
}

impl Block {
    pub fn new(
        config: &ModelConfig,
        self_attn: Attention,
        mlp: Mlp,
        norms: (Tensor, Tensor),
    ) -> Self {
        Self {
            self_attn,
            mlp,
            input_layernorm: norms.0,
            post_attention_layernorm: norms.1,
            rms_norm_eps: config.rms_norm_eps,
        }
    }

    /// Attn(N1 p), returned in the residual dtype. p: (N, d).
    pub fn attention_branch(
        &self,
        p: &Tensor,
        layout: &mut Layout<'_>,
        ctx: &BlockCtx<'_>,
    ) -> Result<Tensor> {
        let x = self.attention_input(p, ctx)?;
        self.self_attn
            .forward(&x, layout, ctx)?
            .to_dtype(ctx.residual_dtype)
    }

    /// MLP(N2 q), returned in the residual dtype. q: (N, d). Token-wise, so it runs over
    /// [`MLP_ROWS`]-row tiles: the (rows x intermediate) activations of one tile are all that
    /// exist at once. The training backward walks the same tiles, so its recomputation is
    /// bit-identical to this.
    pub fn mlp_branch(&self, q: &Tensor, ctx: &BlockCtx<'_>) -> Result<Tensor> {
        let tiles = mlp_tiles(q.dim(0)?)
            .map(|(r0, len)| {
                let x = self.mlp_input(&q.narrow(0, r0, len)?, ctx)?;
                self.mlp.forward(&x)?.to_dtype(ctx.residual_dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        match tiles.len() {
            1 => Ok(tiles.into_iter().next().expect("one tile")),
            _ => Tensor::cat(&tiles, 0),
        }
    }

    /// N1 p in the compute dtype: what the attention projections read.
    pub fn attention_input(&self, p: &Tensor, ctx: &BlockCtx<'_>) -> Result<Tensor> {
        ops::rms_norm(p, &self.input_layernorm, self.rms_norm_eps)?.to_dtype(ctx.compute_dtype)
    }

    /// N2 q in the compute dtype: what the MLP projections read.
    pub fn mlp_input(&self, q: &Tensor, ctx: &BlockCtx<'_>) -> Result<Tensor> {
        ops::rms_norm(q, &self.post_attention_layernorm, self.rms_norm_eps)?
            .to_dtype(ctx.compute_dtype)
    }

    /// f(p) = Attn(N1 p) + MLP(N2 (p + Attn(N1 p))).
    pub fn f(&self, p: &Tensor, layout: &mut Layout<'_>, ctx: &BlockCtx<'_>) -> Result<Tensor> {
        let attn = self.attention_branch(p, layout, ctx)?;
        let mlp = self.mlp_branch(&(p + &attn)?, ctx)?;
        attn + mlp
    }

    /// The block's projection matrices with their HF names relative to the layer.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        projections(&mut self.self_attn, &mut self.mlp)
    }

    /// Named dense parameters (HF names relative to the layer), for training.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![
            ("input_layernorm.weight".into(), &mut self.input_layernorm),
            (
                "post_attention_layernorm.weight".into(),
                &mut self.post_attention_layernorm,
            ),
        ];
        for (name, lin) in projections(&mut self.self_attn, &mut self.mlp) {
            for (kind, t) in lin.dense_tensors_mut() {
                out.push((format!("{name}.{kind}"), t));
            }
        }
        out
    }
}

/// Short names of the block's seven projections, as LoRA targets name them.
pub const PROJECTION_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Attention and MLP projections by name (split borrows, so the norms stay available).
fn projections<'a>(a: &'a mut Attention, m: &'a mut Mlp) -> [(&'static str, &'a mut Linear); 7] {
    [
        ("self_attn.q_proj", &mut a.q_proj),
        ("self_attn.k_proj", &mut a.k_proj),
        ("self_attn.v_proj", &mut a.v_proj),
        ("self_attn.o_proj", &mut a.o_proj),
        ("mlp.gate_proj", &mut m.gate_proj),
        ("mlp.up_proj", &mut m.up_proj),
        ("mlp.down_proj", &mut m.down_proj),
    ]
}
