//! Causal attention: on the CPU in f32 the tiled kernel of `flash_attention.rs`; otherwise
//! computed over chunks of query rows, with a hand-written backward that recomputes each
//! chunk's probabilities instead of keeping them.
//!
//! Autograd through the plain form keeps the (queries x keys) scores, their masked and
//! exponentiated copies and the probabilities of every head: a dozen T x T tensors per block,
//! which dominate one block's working set at long context (32 MB per sample per tensor at 1024
//! tokens and 8 heads in f32). Here the graph records one node whose saved state is q, k, v and
//! the output; the backward walks the same chunks again. Chunks also skip the keys no query in
//! them can see, halving the work of a causal pass.
//!
//! Forward and recomputation run the same ops on the same chunks, so the output is bit-identical
//! between the two (the exact reversible mode depends on that).

use crate::model::custom_vjp;
use crate::model::flash_attention::{self, Geometry};
use crate::model::matmul::matmul;
use crate::model::ops;
use crate::model::rope::RopeTables;
use candle_core::{DType, Result, Tensor, D};

/// Query positions per chunk: bounds a chunk's scores to `CHUNK` x keys per head.
pub const CHUNK: usize = 128;

/// One causal attention call: the shapes and settings its forward and backward share.
///
/// Queries are (B, KvH, rep*T, Dh), the `rep` query heads sharing a KV head stacked along the
/// rows, at positions `start..start+T`; keys and values are (B, KvH, K, Dh) at positions 0..K.
/// Scores and softmax run in `score_dtype`; matmuls in q's dtype.
#[derive(Clone)]
pub struct CausalAttention {
    /// Query heads per KV head: q rows are `rep` stacked blocks of `seq` positions.
    rep: usize,
    seq: usize,
    /// Position of the first query (keys start at position 0).
    start: usize,
    scale: f64,
    /// dtype of the scores, softmax and its backward (f32, or f64 for reference checks).
    score_dtype: DType,
    chunk: usize,
    masks: RopeTables,
}

/// One chunk of query positions `t0..t0+len`, which sees keys `0..keys`.
struct Chunk {
    t0: usize,
    len: usize,
    keys: usize,
}

impl CausalAttention {
    /// For `q_rows` query rows per KV head (rep * seq).
    pub fn new(
        q_rows: usize,
        seq: usize,
        start: usize,
        scale: f64,
        score_dtype: DType,
        masks: &RopeTables,
    ) -> Self {
        Self {
            rep: q_rows / seq.max(1),
            seq,
            start,
            scale,
            score_dtype,
            chunk: CHUNK,
            masks: masks.clone(),
        }
    }

    /// The same attention over chunks of `chunk` query positions (tests cross chunk borders).
    pub fn with_chunk(self, chunk: usize) -> Self {
        Self { chunk, ..self }
    }

    /// The output, recorded with its hand-written backward when an input is part of a graph.
    pub fn apply(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let output = self.forward(&q.detach(), &k.detach(), &v.detach())?;
        let this = self.clone();
        custom_vjp::record3(&q, &k, &v, output, move |q, k, v, g| {
            this.backward(q, k, v, g, None)
        })
    }

    /// The tiled kernel's shapes when it runs this call: f32 scores of f32 operands.
    fn geometry(&self, q: &Tensor, k: &Tensor) -> Option<Geometry> {
        let (b, kvh, _, dh) = q.dims4().ok()?;
        let tiled =
            q.device().is_cpu() && self.score_dtype == DType::F32 && q.dtype() == DType::F32;
        tiled.then(|| Geometry {
            heads: b * kvh,
            rep: self.rep,
            seq: self.seq,
            start: self.start,
            keys: k.dim(2).unwrap_or(0),
            head_dim: dh,
            scale: self.scale as f32,
        })
    }

    fn chunks(&self, total_keys: usize) -> impl Iterator<Item = Chunk> + '_ {
        (0..self.seq).step_by(self.chunk.max(1)).map(move |t0| {
            let len = self.chunk.max(1).min(self.seq - t0);
            Chunk {
                t0,
                len,
                keys: (self.start + t0 + len).min(total_keys),
            }
        })
    }

    /// Rows of a (B, KvH, rep*T, X) tensor for the chunk's positions, (B, KvH, rep*len, X).
    fn rows(&self, x: &Tensor, c: &Chunk) -> Result<Tensor> {
        let (b, kvh, _, width) = x.dims4()?;
        x.reshape((b, kvh, self.rep, self.seq, width))?
            .narrow(3, c.t0, c.len)?
            .reshape((b, kvh, self.rep * c.len, width))
    }

    /// Puts per-chunk rows (from `rows`) back in order, (B, KvH, rep*T, X).
    fn assemble(&self, parts: Vec<Tensor>) -> Result<Tensor> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let (b, kvh, _, width) = parts[0].dims4()?;
        let split = parts
            .iter()
            .map(|p| {
                let len = p.dim(2)? / self.rep;
                p.reshape((b, kvh, self.rep, len, width))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&split, 3)?.reshape((b, kvh, self.rep * self.seq, width))
    }

    /// The chunk's attention probabilities, (B, KvH, rep*len, keys) in the score dtype.
    fn probabilities(&self, q_rows: &Tensor, k: &Tensor, c: &Chunk) -> Result<Tensor> {
        let (b, kvh, rows, _) = q_rows.dims4()?;
        let k = k.narrow(2, 0, c.keys)?;
        let raw = matmul(q_rows, &k.t()?)?;
        let scores = (raw * self.scale)?.to_dtype(self.score_dtype)?;
        // Only when the chunk's first query cannot see every key (not in one-token decoding).
        let scores = if self.start + c.t0 + 1 < c.keys {
            let mask =
                self.masks
                    .causal_mask(c.len, c.keys, self.start + c.t0, self.score_dtype)?;
            scores
                .reshape((b, kvh, self.rep, c.len, c.keys))?
                .broadcast_add(&mask)?
                .reshape((b, kvh, rows, c.keys))?
        } else {
            scores
        };
        ops::softmax_last_dim(&scores)
    }

    /// The cotangent of the scaled scores q k^T for the probabilities `p` and their cotangent:
    /// dS = scale P * (dP - rowsum(dP * P)).
    fn softmax_backward(&self, p: &Tensor, grad_p: &Tensor) -> Result<Tensor> {
        let inner = (grad_p * p)?.sum_keepdim(D::Minus1)?;
        (p * grad_p.broadcast_sub(&inner)?)? * self.scale
    }

    /// softmax(q k^T * scale + mask) v, with no graph. (B, KvH, rep*T, Dh).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_stats(q, k, v)?.0)
    }

    /// The output and, when the tiled kernel ran, each query row's log-sum-exp (B*KvH, rep*T):
    /// what its backward needs besides the cotangent.
    pub fn forward_with_stats(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(geometry) = self.geometry(q, k) {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            if let Some(result) = flash_attention::forward(&q, &k, &v, geometry) {
                let (out, lse) = result?;
                return Ok((out, Some(lse)));
            }
        }
        let parts = self
            .chunks(k.dim(2)?)
            .map(|c| {
                let p = self.probabilities(&self.rows(q, &c)?, k, &c)?;
                matmul(&p.to_dtype(v.dtype())?, &v.narrow(2, 0, c.keys)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((self.assemble(parts)?, None))
    }

    /// Cotangents of q, k and v for the output cotangent `g`. The tiled kernel needs the
    /// forward's statistics: `saved` gives them (the log-sum-exp from `forward_with_stats`, and
    /// rowsum(g * output), both (B*KvH, rep*T)), or they are recomputed.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
        saved: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if let Some(geometry) = self.geometry(q, k) {
            let (q, k, v, g) = (
                &q.contiguous()?,
                &k.contiguous()?,
                &v.contiguous()?,
                g.contiguous()?,
            );
            let recomputed;
            let (lse, delta) = match saved {
                Some(stats) => stats,
                None => {
                    let (out, lse) = self.forward_with_stats(q, k, v)?;
                    let delta = flash_attention::delta(&out, &g, geometry.head_dim);
                    let (Some(lse), Some(delta)) = (lse, delta) else {
                        return self.chunked_backward(q, k, v, &g);
                    };
                    recomputed = (delta?.reshape(lse.dims())?, lse);
                    (&recomputed.1, &recomputed.0)
                }
            };
            if let Some(result) = flash_attention::backward(q, k, v, &g, lse, delta, geometry) {
                return result;
            }
        }
        self.chunked_backward(q, k, v, g)
    }

    fn chunked_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let total_keys = k.dim(2)?;
        let mut grad_q = Vec::new();
        let mut grad_k = k.zeros_like()?;
        let mut grad_v = v.zeros_like()?;
        for c in self.chunks(total_keys) {
            let q_rows = self.rows(q, &c)?;
            let g_rows = self.rows(g, &c)?;
            let (k_c, v_c) = (k.narrow(2, 0, c.keys)?, v.narrow(2, 0, c.keys)?);
            let p = self.probabilities(&q_rows, k, &c)?;
            let p_compute = p.to_dtype(v.dtype())?;
            let pad = total_keys - c.keys;
            grad_v = (grad_v + matmul(&p_compute.t()?, &g_rows)?.pad_with_zeros(2, 0, pad)?)?;
            // Softmax backward: dS = P * (dP - rowsum(dP * P)).
            let grad_p = matmul(&g_rows, &v_c.t()?)?.to_dtype(self.score_dtype)?;
            let grad_qk = self.softmax_backward(&p, &grad_p)?.to_dtype(q.dtype())?;
            grad_q.push(matmul(&grad_qk, &k_c)?);
            grad_k = (grad_k + matmul(&grad_qk.t()?, &q_rows)?.pad_with_zeros(2, 0, pad)?)?;
        }
        Ok((self.assemble(grad_q)?, grad_k, grad_v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::max_abs_diff as diff;
    use candle_core::Device;

    /// The plain form (as inference runs it), differentiated by autograd: the reference.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, seq: usize, masks: &RopeTables) -> Tensor {
        let (b, kvh, rows, _) = q.dims4().unwrap();
        let rep = rows / seq;
        let keys = k.dim(2).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.125).unwrap();
        let mask = masks.causal_mask(seq, keys, 0, DType::F64).unwrap();
        let scores = scores
            .reshape((b, kvh, rep, seq, keys))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((b, kvh, rows, keys))
            .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = exp
            .broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
            .unwrap();
        p.matmul(v).unwrap()
    }

    /// Outputs and gradients of q, k, v equal autograd through the plain form, in f64, with
    /// several chunks (the last one short), grouped heads and a cotangent that weights every
    /// output differently.
    #[test]
    fn matches_autograd_through_the_plain_form() {
        let dev = Device::Cpu;
        let (b, kvh, rep, seq, dh) = (2, 2, 3, 11, 8);
        let masks = RopeTables::new(dh, 10_000.0, 64, &dev).unwrap();
        let var = |rows| {
            candle_core::Var::from_tensor(
                &Tensor::randn(0f64, 1.0, (b, kvh, rows, dh), &dev).unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (var(rep * seq), var(seq), var(seq));
        let weights = Tensor::randn(0f64, 1.0, (b, kvh, rep * seq, dh), &dev).unwrap();
        let want = plain(q.as_tensor(), k.as_tensor(), v.as_tensor(), seq, &masks);
        let want_grads = (&want * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for chunk in [4, 11, 128] {
            let got = CausalAttention::new(rep * seq, seq, 0, 0.125, DType::F64, &masks)
                .with_chunk(chunk)
                .apply(q.as_tensor(), k.as_tensor(), v.as_tensor())
                .unwrap();
            assert!(diff(&got, &want) < 1e-13, "chunk {chunk}: output");
            let grads = (&got * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (g, w) = (
                    grads.get(x.as_tensor()).unwrap(),
                    want_grads.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    diff(g, w) < 1e-12,
                    "chunk {chunk}: grad {name} {}",
                    diff(g, w)
                );
            }
        }
    }

    /// The f32 CPU path (the tiled kernel) against the chunked form in f64 through
    /// `CausalAttention` itself: stacked heads, queries continuing at position 5 of a cache,
    /// chunks shorter than the sequence, statistics recomputed by the backward.
    #[test]
    fn tiled_f32_path_matches_the_f64_chunked_form() {
        let dev = Device::Cpu;
        let (b, kvh, rep, seq, start, dh) = (2, 2, 3, 11, 5, 8);
        let masks = RopeTables::new(dh, 10_000.0, 64, &dev).unwrap();
        let x = |rows| Tensor::randn(0f32, 1.0, (b, kvh, rows, dh), &dev).unwrap();
        let (q, k, v, g) = (x(rep * seq), x(start + seq), x(start + seq), x(rep * seq));
        let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let attention =
            |dtype| CausalAttention::new(rep * seq, seq, start, 0.35, dtype, &masks).with_chunk(4);
        let (narrow, reference) = (attention(DType::F32), attention(DType::F64));
        let got = narrow.forward(&q, &k, &v).unwrap();
        let want = reference.forward(&wide(&q), &wide(&k), &wide(&v)).unwrap();
        assert!(diff(&got, &want) < 1e-5, "output {}", diff(&got, &want));
        let got = narrow.backward(&q, &k, &v, &g, None).unwrap();
        let want = reference
            .backward(&wide(&q), &wide(&k), &wide(&v), &wide(&g), None)
            .unwrap();
        for (name, got, want) in [
            ("q", got.0, want.0),
            ("k", got.1, want.1),
            ("v", got.2, want.2),
        ] {
            assert!(
                diff(&got, &want) < 1e-4,
                "grad {name} {}",
                diff(&got, &want)
            );
        }
    }

    /// The output without a graph is the one the graph node hands back, bit for bit.
    #[test]
    fn recorded_and_plain_outputs_are_identical() {
        let dev = Device::Cpu;
        let masks = RopeTables::new(8, 10_000.0, 64, &dev).unwrap();
        let x = |rows| Tensor::randn(0f32, 1.0, (1, 1, rows, 8), &dev).unwrap();
        let (q, k, v) = (x(20), x(10), x(10));
        let q_var = candle_core::Var::from_tensor(&q).unwrap();
        let run = |q: &Tensor| {
            CausalAttention::new(20, 10, 0, 0.3, DType::F32, &masks)
                .with_chunk(4)
                .apply(q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(&q), run(q_var.as_tensor()));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
