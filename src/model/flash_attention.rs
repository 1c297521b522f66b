//! Tiled causal attention on the CPU, forward and backward: the FlashAttention-2 algorithm
//! (Dao, 2023) for f32.
//!
//! The chunked form (`attention.rs`) still builds a (query chunk x every visible key) score
//! tensor per head, and its backward a few more: at 1,024 tokens that is most of a block's
//! working set. Here a task owns one tile of query rows and walks the keys a tile at a time
//! with an online softmax (running maximum and sum, the partial output rescaled as the maximum
//! grows), so only a (query tile x key tile) block of scores ever exists, and the forward keeps
//! one log-sum-exp per row instead of the probabilities. The backward recomputes each tile's
//! probabilities from it in two passes: one task per key tile accumulates that tile's dK and dV
//! over the queries that see it, one task per query tile accumulates its dQ. No two tasks write
//! the same element, so there are no atomics, and every sum runs in the same order whatever the
//! thread count: the forward is bit-identical between the pass and its recomputation, which the
//! exact reversible mode needs.
//!
//! Layout, as `attention.rs`: queries (heads, rep * seq, head_dim), the `rep` query heads that
//! share a key head stacked along the rows, at positions `start..start + seq`; keys and values
//! (heads, keys, head_dim) at positions `0..keys`.

use crate::kernels::vector_math::{exp, max_of, sum_f64, wide};
use crate::model::ops::with_cpu_f32;
use crate::model::parallel::{self, SharedMut};
use candle_core::{Result, Tensor};

/// Query rows per task: a tile's scores (QUERY_TILE x KEY_TILE f32) and its operands stay in
/// the L2 cache.
const QUERY_TILE: usize = 64;
/// Keys per step of a task's walk.
const KEY_TILE: usize = 128;

/// The shapes of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Independent (queries, keys, values) groups: batch x key heads.
    pub heads: usize,
    /// Query heads per key head, stacked along the rows.
    pub rep: usize,
    /// Query positions per stacked head.
    pub seq: usize,
    /// Position of the first query (keys start at 0): a KV cache's length before this call.
    pub start: usize,
    pub keys: usize,
    pub head_dim: usize,
    /// Multiplies q k^T before the softmax.
    pub scale: f32,
}

impl Geometry {
    /// Query rows per head group.
    fn rows(&self) -> usize {
        self.rep * self.seq
    }

    fn query_tiles(&self) -> usize {
        self.seq.div_ceil(QUERY_TILE)
    }

    /// Task `i` of the query-tile passes: (first row of its tile over all heads, positions
    /// `t0..t0 + len` of its stacked head, its key head).
    fn query_task(&self, i: usize) -> QueryTile {
        let per_head = self.rep * self.query_tiles();
        let (head, rest) = (i / per_head, i % per_head);
        let (stacked, tile) = (rest / self.query_tiles(), rest % self.query_tiles());
        let t0 = tile * QUERY_TILE;
        QueryTile {
            head,
            row: head * self.rows() + stacked * self.seq + t0,
            t0,
            len: QUERY_TILE.min(self.seq - t0),
        }
    }

    /// Keys `0..end` are visible to some query of the tile.
    fn visible_end(&self, tile: &QueryTile) -> usize {
        (self.start + tile.t0 + tile.len).min(self.keys)
    }

    /// Keys of the tile starting at key `j0` (of `kl`) that query `i` of `tile` sees.
    fn visible(&self, tile: &QueryTile, i: usize, j0: usize, kl: usize) -> usize {
        (self.start + tile.t0 + i + 1)
            .min(j0 + kl)
            .saturating_sub(j0)
    }

    fn check(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let rows = self.heads * self.rows() * self.head_dim;
        let keys = self.heads * self.keys * self.head_dim;
        if q != rows || k != keys || v != keys || self.keys == 0 {
            candle_core::bail!("flash attention: operands do not match {self:?}");
        }
        Ok(())
    }
}

struct QueryTile {
    head: usize,
    row: usize,
    t0: usize,
    len: usize,
}

/// dst (m x n, rows `dst_rs` apart, columns adjacent) = [dst +] scale * lhs (m x k) rhs (k x n),
/// on the calling thread; lhs and rhs are (pointer, row stride, column stride).
///
/// # Safety
/// Every pointer must address its matrix at the given strides.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The attention output (shaped as `q`) and each query row's log-sum-exp of its scaled scores,
/// (heads, rep * seq); None unless q, k and v are contiguous f32 CPU tensors.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: Geometry,
) -> Option<Result<(Tensor, Tensor)>> {
    let result = with_cpu_f32(&[q, k, v], |t| -> Result<(Vec<f32>, Vec<f32>)> {
        let (q, k, v) = (t[0], t[1], t[2]);
        g.check(q.len(), k.len(), v.len())?;
        Ok(forward_slices(q, k, v, g))
    })?;
    Some(result.and_then(|r| r).and_then(|(out, lse)| {
        Ok((
            Tensor::from_vec(out, q.shape(), q.device())?,
            Tensor::from_vec(lse, (g.heads, g.rows()), q.device())?,
        ))
    }))
}

fn forward_slices(q: &[f32], k: &[f32], v: &[f32], g: Geometry) -> (Vec<f32>, Vec<f32>) {
    let dh = g.head_dim;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; g.heads * g.rows()];
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    parallel::for_each(g.heads * g.rep * g.query_tiles(), |i| {
        let tile = g.query_task(i);
        // SAFETY: each task owns its tile's rows of `out` and `lse` (query_task maps tasks to
        // disjoint row ranges inside the buffers).
        let (out, lse) = unsafe {
            (
                std::slice::from_raw_parts_mut(out_ptr.ptr().add(tile.row * dh), tile.len * dh),
                std::slice::from_raw_parts_mut(lse_ptr.ptr().add(tile.row), tile.len),
            )
        };
        let keys = tile.head * g.keys * dh..(tile.head + 1) * g.keys * dh;
        forward_tile(
            &q[tile.row * dh..],
            &k[keys.clone()],
            &v[keys],
            &tile,
            &g,
            out,
            lse,
        );
    });
    (out, lse)
}

/// One query tile against every key it sees, with an online softmax.
fn forward_tile(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tile: &QueryTile,
    g: &Geometry,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (dh, len) = (g.head_dim, tile.len);
    let mut scores = vec![0f32; len * KEY_TILE];
    let mut max = vec![f32::NEG_INFINITY; len];
    let mut sum = vec![0f64; len];
    let end = g.visible_end(tile);
    for j0 in (0..end).step_by(KEY_TILE) {
        let kl = KEY_TILE.min(end - j0);
        let s = &mut scores[..len * kl];
        // SAFETY: q holds `len` rows of dh, k holds keys j0..j0 + kl (read as k^T), s is len x kl.
        unsafe {
            product(
                (len, kl, dh),
                s.as_mut_ptr(),
                kl,
                false,
                (q.as_ptr(), dh, 1),
                (k.as_ptr().add(j0 * dh), 1, dh),
                g.scale,
            )
        };
        wide(|| {
            for i in 0..len {
                let visible = g.visible(tile, i, j0, kl);
                let row = &mut s[i * kl..(i + 1) * kl];
                row[visible..].fill(0.0);
                if visible == 0 {
                    continue;
                }
                let new_max = max[i].max(max_of(&row[..visible]));
                // 0 on the first tile (the maximum was -inf), so the empty partial sums vanish.
                let correction = exp(max[i] - new_max);
                for x in &mut row[..visible] {
                    *x = exp(*x - new_max);
                }
                sum[i] = sum[i] * f64::from(correction) + sum_f64(&row[..visible]);
                if correction != 1.0 {
                    out[i * dh..(i + 1) * dh]
                        .iter_mut()
                        .for_each(|o| *o *= correction);
                }
                max[i] = new_max;
            }
        });
        // SAFETY: s is len x kl, v holds keys j0..j0 + kl, out is len x dh.
        unsafe {
            product(
                (len, dh, kl),
                out.as_mut_ptr(),
                dh,
                true,
                (s.as_ptr(), kl, 1),
                (v.as_ptr().add(j0 * dh), dh, 1),
                1.0,
            )
        };
    }
    for i in 0..len {
        let inverse = (1.0 / sum[i]) as f32;
        out[i * dh..(i + 1) * dh]
            .iter_mut()
            .for_each(|o| *o *= inverse);
        lse[i] = max[i] + sum[i].ln() as f32;
    }
}

/// Cotangents of q, k and v for the output cotangent `d_out` (shaped as q), given the forward's
/// log-sum-exp and each row's `delta` = rowsum(d_out * out), both (heads, rep * seq). None
/// unless every operand is a contiguous f32 CPU tensor.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    g: Geometry,
) -> Option<Result<(Tensor, Tensor, Tensor)>> {
    let result = with_cpu_f32(&[q, k, v, d_out, lse, delta], |t| {
        let [q, k, v, d_out, lse, delta] = [t[0], t[1], t[2], t[3], t[4], t[5]];
        g.check(q.len(), k.len(), v.len())?;
        if d_out.len() != q.len() || lse.len() != g.heads * g.rows() || delta.len() != lse.len() {
            candle_core::bail!("flash attention backward: cotangent or statistics mis-shaped");
        }
        let slices = Operands {
            q,
            k,
            v,
            d_out,
            lse,
            delta,
        };
        Ok((key_pass(&slices, g), query_pass(&slices, g)))
    })?;
    Some(result.and_then(|r| r).and_then(|((dk, dv), dq)| {
        Ok((
            Tensor::from_vec(dq, q.shape(), q.device())?,
            Tensor::from_vec(dk, k.shape(), k.device())?,
            Tensor::from_vec(dv, v.shape(), v.device())?,
        ))
    }))
}

/// rowsum(d_out * out) per query row: the backward's `delta`, from tensors shaped as q.
pub fn delta(out: &Tensor, d_out: &Tensor, head_dim: usize) -> Option<Result<Tensor>> {
    let rows = out.elem_count() / head_dim.max(1);
    let result = crate::model::ops::on_cpu_f32(&[out, d_out], |t| {
        let (o, d) = (t[0], t[1]);
        let mut delta = vec![0f32; rows];
        parallel::map_chunks(&mut delta, 1024, |c, chunk| {
            for (r, x) in chunk.iter_mut().enumerate() {
                let row = (c * 1024 + r) * head_dim..(c * 1024 + r + 1) * head_dim;
                *x = o[row.clone()]
                    .iter()
                    .zip(&d[row])
                    .map(|(&o, &d)| f64::from(o) * f64::from(d))
                    .sum::<f64>() as f32;
            }
        });
        delta
    })?;
    Some(result.and_then(|d| {
        let dims = out.dims();
        Tensor::from_vec(d, &dims[..dims.len() - 1], out.device())
    }))
}

struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d_out: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

/// Recomputes the probabilities of `tile` x keys `j0..j0 + kl` into `p` (len x kl) and turns
/// `ds` into the scores' cotangent, scale * P * (dP - delta), dP = d_out v^T.
fn tile_gradients(
    x: &Operands<'_>,
    g: &Geometry,
    tile: &QueryTile,
    (j0, kl): (usize, usize),
    p: &mut [f32],
    ds: &mut [f32],
) {
    let (dh, len) = (g.head_dim, tile.len);
    let key = tile.head * g.keys + j0;
    // SAFETY: the tile's rows of q and d_out, keys j0..j0 + kl of k and v, p and ds len x kl
    // (the callers size them so).
    unsafe {
        product(
            (len, kl, dh),
            p.as_mut_ptr(),
            kl,
            false,
            (x.q.as_ptr().add(tile.row * dh), dh, 1),
            (x.k.as_ptr().add(key * dh), 1, dh),
            g.scale,
        );
        product(
            (len, kl, dh),
            ds.as_mut_ptr(),
            kl,
            false,
            (x.d_out.as_ptr().add(tile.row * dh), dh, 1),
            (x.v.as_ptr().add(key * dh), 1, dh),
            1.0,
        );
    }
    wide(|| {
        for i in 0..len {
            let visible = g.visible(tile, i, j0, kl);
            let (lse, delta) = (x.lse[tile.row + i], x.delta[tile.row + i]);
            let (p, ds) = (&mut p[i * kl..(i + 1) * kl], &mut ds[i * kl..(i + 1) * kl]);
            for (p, ds) in p[..visible].iter_mut().zip(&mut ds[..visible]) {
                *p = exp(*p - lse);
                *ds = *p * (*ds - delta) * g.scale;
            }
            p[visible..].fill(0.0);
            ds[visible..].fill(0.0);
        }
    });
}

/// dK and dV: one task per key tile, over every query tile that sees it.
fn key_pass(x: &Operands<'_>, g: Geometry) -> (Vec<f32>, Vec<f32>) {
    let dh = g.head_dim;
    let mut dk = vec![0f32; x.k.len()];
    let mut dv = vec![0f32; x.v.len()];
    let key_tiles = g.keys.div_ceil(KEY_TILE);
    let (dk_ptr, dv_ptr) = (SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    parallel::for_each(g.heads * key_tiles, |task| {
        let (head, j0) = (task / key_tiles, (task % key_tiles) * KEY_TILE);
        let kl = KEY_TILE.min(g.keys - j0);
        let offset = (head * g.keys + j0) * dh;
        let (mut p, mut ds) = (vec![0f32; QUERY_TILE * kl], vec![0f32; QUERY_TILE * kl]);
        for i in 0..g.rep * g.query_tiles() {
            let tile = g.query_task(head * g.rep * g.query_tiles() + i);
            if g.start + tile.t0 + tile.len <= j0 {
                continue; // no query of the tile sees these keys
            }
            let len = tile.len;
            tile_gradients(x, &g, &tile, (j0, kl), &mut p, &mut ds);
            // SAFETY: this task alone writes keys j0..j0 + kl of its head in dk and dv; p and ds
            // are len x kl, the tile's q and d_out rows len x dh.
            unsafe {
                product(
                    (kl, dh, len),
                    dv_ptr.ptr().add(offset),
                    dh,
                    true,
                    (p.as_ptr(), 1, kl),
                    (x.d_out.as_ptr().add(tile.row * dh), dh, 1),
                    1.0,
                );
                product(
                    (kl, dh, len),
                    dk_ptr.ptr().add(offset),
                    dh,
                    true,
                    (ds.as_ptr(), 1, kl),
                    (x.q.as_ptr().add(tile.row * dh), dh, 1),
                    1.0,
                );
            }
        }
    });
    (dk, dv)
}

/// dQ: one task per query tile, over the keys it sees.
fn query_pass(x: &Operands<'_>, g: Geometry) -> Vec<f32> {
    let dh = g.head_dim;
    let mut dq = vec![0f32; x.q.len()];
    let dq_ptr = SharedMut(dq.as_mut_ptr());
    parallel::for_each(g.heads * g.rep * g.query_tiles(), |i| {
        let tile = g.query_task(i);
        let (mut p, mut ds) = (
            vec![0f32; tile.len * KEY_TILE],
            vec![0f32; tile.len * KEY_TILE],
        );
        let end = g.visible_end(&tile);
        for j0 in (0..end).step_by(KEY_TILE) {
            let kl = KEY_TILE.min(end - j0);
            tile_gradients(x, &g, &tile, (j0, kl), &mut p, &mut ds);
            // SAFETY: this task alone writes its tile's rows of dq; ds is len x kl, k's keys
            // j0..j0 + kl of the tile's head kl x dh.
            unsafe {
                product(
                    (tile.len, dh, kl),
                    dq_ptr.ptr().add(tile.row * dh),
                    dh,
                    true,
                    (ds.as_ptr(), kl, 1),
                    (x.k.as_ptr().add((tile.head * g.keys + j0) * dh), dh, 1),
                    1.0,
                );
            }
        }
    });
    dq
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::CausalAttention;
    use crate::model::ops::max_abs_diff as diff;
    use crate::model::rope::RopeTables;
    use candle_core::{DType, Device};

    /// Against the chunked attention in f64 (itself tested against autograd through the plain
    /// form): shapes that are not multiples of either tile, grouped heads, queries continuing a
    /// cache, and one-token decoding.
    #[test]
    fn matches_the_f64_reference_on_ragged_shapes() {
        let dev = Device::Cpu;
        for (b, kvh, rep, seq, start, dh) in [
            (2, 2, 3, 150, 0, 16),
            (1, 3, 1, 70, 200, 8),
            (1, 1, 4, 1, 300, 32),
            (1, 2, 2, 257, 3, 64),
        ] {
            let masks = RopeTables::new(dh, 10_000.0, 1024, &dev).unwrap();
            let x = |rows| Tensor::randn(0f32, 1.0, (b, kvh, rows, dh), &dev).unwrap();
            let keys = start + seq;
            let (q, k, v, g) = (x(rep * seq), x(keys), x(keys), x(rep * seq));
            let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let reference = CausalAttention::new(rep * seq, seq, start, 0.3, DType::F64, &masks);
            let geometry = Geometry {
                heads: b * kvh,
                rep,
                seq,
                start,
                keys,
                head_dim: dh,
                scale: 0.3,
            };
            let (out, lse) = forward(&q, &k, &v, geometry).unwrap().unwrap();
            let want = reference.forward(&wide(&q), &wide(&k), &wide(&v)).unwrap();
            let case = format!("{b}x{kvh}x{rep}, seq {seq} from {start}, dh {dh}");
            assert!(
                diff(&out, &want) < 2e-5,
                "{case}: output {}",
                diff(&out, &want)
            );
            assert_eq!(lse.dims(), [b * kvh, rep * seq]);
            let delta = delta(&out, &g, dh).unwrap().unwrap();
            let delta = delta.reshape((b * kvh, rep * seq)).unwrap();
            let (dq, dk, dv) = backward(&q, &k, &v, &g, &lse, &delta, geometry)
                .unwrap()
                .unwrap();
            let (wq, wk, wv) = reference
                .backward(&wide(&q), &wide(&k), &wide(&v), &wide(&g), None)
                .unwrap();
            for (name, got, want) in [("q", dq, wq), ("k", dk, wk), ("v", dv, wv)] {
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let err = diff(&got, &want) / scale.max(1.0);
                assert!(err < 1e-4, "{case}: grad {name} {err}");
            }
        }
    }

    /// The forward is a function of its inputs alone: the same bits on a second call (and, by
    /// construction, whatever the thread count: tiles are fixed and each has one writer).
    #[test]
    fn forward_is_deterministic() {
        let dev = Device::Cpu;
        let x = |rows| Tensor::randn(0f32, 1.0, (1, 2, rows, 32), &dev).unwrap();
        let (q, k, v) = (x(2 * 300), x(300), x(300));
        let geometry = Geometry {
            heads: 2,
            rep: 2,
            seq: 300,
            start: 0,
            keys: 300,
            head_dim: 32,
            scale: 0.2,
        };
        let bits = |t: Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let first = bits(forward(&q, &k, &v, geometry).unwrap().unwrap().0);
        let second = bits(forward(&q, &k, &v, geometry).unwrap().unwrap().0);
        assert_eq!(first, second);
    }
}
