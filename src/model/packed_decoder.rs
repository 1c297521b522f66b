//! The CPU decode path: the whole inference step of a [`Model`] on weights repacked at load,
//! 8-bit integer products and one persistent thread team, instead of a sequence of generic
//! tensor ops. Per layer: RMSNorm and the quantisation of its output, Q, K and V in one product,
//! RoPE and the cache append in one pass, attention over the cache, the output projection,
//! gate and up in one product with SwiGLU, the down projection, and the scheme's update of the
//! two residual streams. A batch of sequences reads each weight once per step.
//!
//! Built from a model whose weights it copies; the model keeps serving training and scoring.

use crate::kernels::isa::Isa;
use crate::kernels::packed_matrix::{FourBit, Input, PackedMatrix};
use crate::kernels::quantize::{QuantizedRows, BLOCK};
use crate::kernels::team::Team;
use crate::kernels::vector;
use crate::model::config::ModelConfig;
use crate::model::decoder::{LogitRows, Model, SeqInput};
use crate::model::kv_cache::HostLayerKv;
use crate::model::linear::{Linear, Weight};
use crate::model::parallel::SharedMut;
use crate::model::reversible::{Readout, ReversibleConfig, SchemeKind, TwoStep};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Mutex};

/// A projection: packed weight and optional bias.
#[derive(Debug)]
struct PackedLinear {
    weight: PackedMatrix,
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
struct PackedLayer {
    attention_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// Q, K and V stacked: rows q_dim + 2 kv_dim.
    qkv: PackedLinear,
    output: PackedLinear,
    /// gate and up stacked: rows 2 ffn.
    gate_up: PackedLinear,
    down: PackedLinear,
}

#[derive(Debug)]
pub struct PackedDecoder {
    config: ModelConfig,
    embedding: Arc<PackedMatrix>,
    layers: Vec<PackedLayer>,
    norm: Vec<f32>,
    head: Arc<PackedMatrix>,
    /// (max_positions, head_dim/2) each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    isa: Isa,
    scratch: Mutex<Scratch>,
}

/// Buffers reused across steps, so a step allocates only when the batch grows.
#[derive(Debug, Default)]
struct Scratch {
    other: Vec<f32>,
    last: Vec<f32>,
    normed: Vec<f32>,
    quantized: QuantizedRows,
    qkv: Vec<f32>,
    attention: Vec<f32>,
    branch: Vec<f32>,
    hidden: Vec<f32>,
    gate_up: Vec<f32>,
    activated: Vec<f32>,
    mlp: Vec<f32>,
    scores: Vec<Vec<f32>>,
}

/// What one forward step works on: the sequences with their caches, their rows, the team.
struct Step<'s, 'a> {
    seqs: &'s mut [SeqInput<'a>],
    spans: &'s [Span],
    team: &'s Team,
}

/// A sequence's place in the step's rows.
#[derive(Clone, Copy)]
struct Span {
    first_row: usize,
    len: usize,
    /// Cached positions before this step.
    start: usize,
}

impl PackedDecoder {
    /// Packs `model` for CPU decoding; None when it cannot run here (another device, a compute
    /// dtype other than f32, or LoRA adapters not merged).
    pub fn build(model: &Model) -> Result<Option<Self>> {
        let supported = matches!(model.device, Device::Cpu)
            && model.compute_dtype == DType::F32
            && model.residual_dtype == DType::F32
            && model.config.hidden_size.is_multiple_of(BLOCK)
            && model.config.intermediate_size.is_multiple_of(BLOCK)
            && (model.config.num_attention_heads * model.config.head_dim()).is_multiple_of(BLOCK)
            && model.layers.iter().all(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .all(|p| p.lora.is_none())
            })
            && model
                .lm_head
                .as_ref()
                .is_none_or(|h| h.lora.is_none() && h.bias.is_none());
        if !supported {
            return Ok(None);
        }
        let embedding = Arc::new(pack(&[&model.embed_tokens.weight])?);
        let head = match &model.lm_head {
            Some(head) => Arc::new(pack(&[&head.weight])?),
            None => embedding.clone(),
        };
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                Ok(PackedLayer {
                    attention_norm: vector_of(&l.input_layernorm)?,
                    mlp_norm: vector_of(&l.post_attention_layernorm)?,
                    qkv: pack_linear(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    output: pack_linear(&[&a.o_proj])?,
                    gate_up: pack_linear(&[&m.gate_proj, &m.up_proj])?,
                    down: pack_linear(&[&m.down_proj])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The tensor path's own RoPE tables, as host rows.
        let (cos, sin) = model.rope.slice(0, model.rope.max_positions())?;
        let (cos, sin) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        Ok(Some(Self {
            config: model.config.clone(),
            embedding,
            layers,
            norm: vector_of(&model.norm)?,
            head,
            cos,
            sin,
            isa: Isa::best(),
            scratch: Mutex::new(Scratch::default()),
        }))
    }

    /// Runs the step with a given instruction set and team (tests compare them).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// As [`Model::forward_step_rows`] (which checks the inputs): appends each sequence's
    /// tokens to its cache and returns the logits at the chosen rows.
    pub fn forward_step(
        &self,
        seqs: &mut [SeqInput<'_>],
        scheme: &ReversibleConfig,
        rows_out: LogitRows,
        team: &Team,
    ) -> Result<Tensor> {
        let c = &self.config;
        let d = c.hidden_size;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut rows = 0;
        for s in seqs.iter_mut() {
            let start = s.cache.host.len;
            s.cache.host.ensure_layers(c.num_hidden_layers);
            spans.push(Span {
                first_row: rows,
                len: s.tokens.len(),
                start,
            });
            rows += s.tokens.len();
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = &mut *guard;
        scratch.resize(rows, c, team.members());

        // Embedding rows; both states start as e.
        for (n, &token) in seqs.iter().flat_map(|s| s.tokens.iter()).enumerate() {
            let row = &mut scratch.last[n * d..(n + 1) * d];
            for (k, v) in row.iter_mut().enumerate() {
                *v = self.embedding.get(token as usize, k);
            }
        }
        scratch.other.copy_from_slice(&scratch.last);

        let first = scheme.first_scheme_layer();
        let mut step = Step {
            seqs,
            spans: &spans,
            team,
        };
        if first == 1 {
            self.block_f(0, &mut step, scratch);
            for (l, f) in scratch.last.iter_mut().zip(&scratch.branch) {
                *l += f;
            }
        }
        for j in first..self.layers.len() {
            match scheme.two_step(j) {
                Some(coef) => {
                    self.block_f(j, &mut step, scratch);
                    two_step_update(coef, &mut scratch.other, &mut scratch.last, &scratch.branch);
                }
                None => {
                    // hamiltonian, (other, last) = (q, p): q += h Attn(N1 p); p += h MLP(N2 q)
                    let h = scheme.h as f32;
                    self.attention_branch(j, &mut step, scratch);
                    vector::axpy(self.isa, &mut scratch.other, h, &scratch.branch);
                    scratch.hidden.copy_from_slice(&scratch.other);
                    self.mlp_branch(j, scratch, team);
                    vector::axpy(self.isa, &mut scratch.last, h, &scratch.mlp);
                }
            }
        }
        for (s, span) in step.seqs.iter_mut().zip(&spans) {
            s.cache.host.len = span.start + span.len;
        }

        // Read-out of each sequence's last row, final norm, head.
        let readout = if scheme.scheme == SchemeKind::Euler {
            Readout::Last
        } else {
            scheme.readout
        };
        let out_rows: Vec<usize> = match rows_out {
            LogitRows::Last => spans.iter().map(|s| s.first_row + s.len - 1).collect(),
            LogitRows::Every => (0..rows).collect(),
        };
        let mut finals = vec![0.0f32; out_rows.len() * d];
        let mut row = vec![0.0f32; d];
        for (i, &n) in out_rows.iter().enumerate() {
            let (o, l) = (
                &scratch.other[n * d..(n + 1) * d],
                &scratch.last[n * d..(n + 1) * d],
            );
            for ((r, a), b) in row.iter_mut().zip(o).zip(l) {
                *r = match readout {
                    Readout::Last => *b,
                    Readout::Other => *a,
                    Readout::Mean => (a + b) * 0.5,
                };
            }
            vector::rms_norm(
                &row,
                &self.norm,
                c.rms_norm_eps,
                &mut finals[i * d..(i + 1) * d],
            );
        }
        let mut logits = vec![0.0f32; out_rows.len() * c.vocab_size];
        let quantized = &mut scratch.quantized;
        let input = input_for(&self.head, &finals, d, quantized);
        self.head
            .product(team, self.isa, input, &mut logits, c.vocab_size);
        drop(guard);
        Tensor::from_vec(logits, (out_rows.len(), c.vocab_size), &Device::Cpu)
    }

    /// f_j(p) = a + MLP(N2 (p + a)), a = Attn_j(N1 p), for p = `scratch.last`, into
    /// `scratch.branch`.
    fn block_f(&self, j: usize, step: &mut Step<'_, '_>, s: &mut Scratch) {
        self.attention_branch(j, step, s);
        for ((h, p), a) in s.hidden.iter_mut().zip(&s.last).zip(&s.branch) {
            *h = p + a;
        }
        self.mlp_branch(j, s, step.team);
        for (a, m) in s.branch.iter_mut().zip(&s.mlp) {
            *a += m;
        }
    }

    /// Attn_j(N1 p) for p = `s.last` into `s.branch`, appending this step's keys and values.
    fn attention_branch(&self, j: usize, step: &mut Step<'_, '_>, s: &mut Scratch) {
        let Step { seqs, spans, team } = step;
        let (spans, team) = (*spans, *team);
        let c = &self.config;
        let layer = &self.layers[j];
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let (q_dim, kv_dim) = (heads * hd, c.kv_dim());
        let width = q_dim + 2 * kv_dim;
        for (x, out) in s.last.chunks_exact(d).zip(s.normed.chunks_exact_mut(d)) {
            vector::rms_norm(x, &layer.attention_norm, c.rms_norm_eps, out);
        }
        self.linear(&layer.qkv, &s.normed, d, &mut s.quantized, &mut s.qkv, team);

        // RoPE on q and k, then k and v appended to each sequence's cache.
        let half = hd / 2;
        for (seq, span) in seqs.iter_mut().zip(spans) {
            let cache = &mut seq.cache.host.layers[j];
            for t in 0..span.len {
                let pos = span.start + t;
                let (cos, sin) = (
                    &self.cos[pos * half..][..half],
                    &self.sin[pos * half..][..half],
                );
                let row = &mut s.qkv[(span.first_row + t) * width..][..width];
                for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
                    vector::rope(head, cos, sin);
                }
                let (key, value) = row[q_dim..].split_at(kv_dim);
                cache.write(pos, key, value, hd);
            }
        }

        // Causal attention over the cache, one (sequence, head) per task.
        let scale = 1.0 / (hd as f32).sqrt();
        let group = heads / kv_heads;
        let tasks = spans.len() * heads;
        let out = SharedMut(s.attention.as_mut_ptr());
        let scores = SharedMut(s.scores.as_mut_ptr());
        let (qkv, isa) = (&s.qkv, self.isa);
        let caches: Vec<&HostLayerKv> = seqs.iter().map(|q| &q.cache.host.layers[j]).collect();
        team.run(&|member, members| {
            // SAFETY: member m alone uses scores[m]; each task writes its own rows and head.
            let scores = unsafe { &mut *scores.ptr().add(member) };
            for task in (member..tasks).step_by(members) {
                let (i, head) = (task / heads, task % heads);
                let (span, cache) = (spans[i], caches[i]);
                let kv_head = head / group;
                let keys = cache.head_keys(kv_head, hd);
                for t in 0..span.len {
                    let n = span.first_row + t;
                    let q = &qkv[n * width + head * hd..][..hd];
                    // SAFETY: this task alone writes row n's slice for `head`.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(out.ptr().add(n * q_dim + head * hd), hd)
                    };
                    let visible = span.start + t + 1;
                    let offset = kv_head * hd;
                    vector::attend(
                        isa,
                        q,
                        keys,
                        cache.capacity,
                        &cache.values,
                        visible,
                        kv_dim,
                        offset,
                        scale,
                        scores,
                        o,
                    );
                }
            }
        });
        self.linear(
            &layer.output,
            &s.attention,
            q_dim,
            &mut s.quantized,
            &mut s.branch,
            team,
        );
    }

    /// MLP_j(N2 x) for x = `s.hidden` into `s.mlp`.
    fn mlp_branch(&self, j: usize, s: &mut Scratch, team: &Team) {
        let c = &self.config;
        let layer = &self.layers[j];
        let (d, ffn) = (c.hidden_size, c.intermediate_size);
        for (x, out) in s.hidden.chunks_exact(d).zip(s.normed.chunks_exact_mut(d)) {
            vector::rms_norm(x, &layer.mlp_norm, c.rms_norm_eps, out);
        }
        self.linear(
            &layer.gate_up,
            &s.normed,
            d,
            &mut s.quantized,
            &mut s.gate_up,
            team,
        );
        for (gu, out) in s
            .gate_up
            .chunks_exact(2 * ffn)
            .zip(s.activated.chunks_exact_mut(ffn))
        {
            vector::swiglu(self.isa, &gu[..ffn], &gu[ffn..], out);
        }
        self.linear(
            &layer.down,
            &s.activated,
            ffn,
            &mut s.quantized,
            &mut s.mlp,
            team,
        );
    }

    /// out = x W^T + b for rows x of `cols` values.
    fn linear(
        &self,
        p: &PackedLinear,
        x: &[f32],
        cols: usize,
        q: &mut QuantizedRows,
        out: &mut [f32],
        team: &Team,
    ) {
        let rows = p.weight.rows;
        let input = input_for(&p.weight, x, cols, q);
        p.weight.product(team, self.isa, input, out, rows);
        if let Some(bias) = &p.bias {
            for row in out.chunks_exact_mut(rows) {
                for (o, b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
    }
}

/// The input form `m` reads, quantising into `q` when it reads 8 bits.
fn input_for<'a>(
    m: &PackedMatrix,
    x: &'a [f32],
    cols: usize,
    q: &'a mut QuantizedRows,
) -> Input<'a> {
    if m.reads_int8() {
        q.quantize_from(x, cols);
        Input::Int8(q)
    } else {
        Input::F32 { values: x, cols }
    }
}

/// p_{j+1} = a p_{j-1} + b p_j + c f, then (other, last) = (p_j, p_{j+1}); terms with a zero
/// coefficient are skipped and unit ones not multiplied, as the tensor path does.
fn two_step_update(coef: TwoStep, other: &mut [f32], last: &mut [f32], f: &[f32]) {
    let (a, b, c) = (coef.a as f32, coef.b as f32, coef.c as f32);
    for ((o, l), &f) in other.iter_mut().zip(last.iter_mut()).zip(f) {
        let mut next = if c == 1.0 { f } else { f * c };
        if b != 0.0 {
            next += if b == 1.0 { *l } else { *l * b };
        }
        if a != 0.0 {
            next += if a == 1.0 { *o } else { *o * a };
        }
        *o = *l;
        *l = next;
    }
}

impl Scratch {
    fn resize(&mut self, rows: usize, c: &ModelConfig, members: usize) {
        let (d, ffn) = (c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim(), c.kv_dim());
        for (buffer, width) in [
            (&mut self.other, d),
            (&mut self.last, d),
            (&mut self.normed, d),
            (&mut self.qkv, q_dim + 2 * kv_dim),
            (&mut self.attention, q_dim),
            (&mut self.branch, d),
            (&mut self.hidden, d),
            (&mut self.gate_up, 2 * ffn),
            (&mut self.activated, ffn),
            (&mut self.mlp, d),
        ] {
            buffer.resize(rows * width, 0.0);
        }
        self.scores.resize_with(members, Vec::new);
    }
}

fn vector_of(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn pack_linear(parts: &[&Linear]) -> Result<PackedLinear> {
    let weights: Vec<&Weight> = parts.iter().map(|p| &p.weight).collect();
    let bias = if parts.iter().any(|p| p.bias.is_some()) {
        let mut bias = Vec::new();
        for p in parts {
            match &p.bias {
                Some(b) => bias.extend(vector_of(b)?),
                None => bias.extend(std::iter::repeat_n(0.0, p.weight.shape()[0])),
            }
        }
        Some(bias)
    } else {
        None
    };
    Ok(PackedLinear {
        weight: pack(&weights)?,
        bias,
    })
}

/// Stacks the rows of `parts` into one packed matrix: 4-bit GGUF blocks (Q4_0, Q4_1, Q4_K) are
/// repacked at 4 bits, Q8_0 blocks as they are, dense f32 kept, anything else (other K-quants,
/// mixed types, f16/bf16) requantised to 8 bits.
fn pack(parts: &[&Weight]) -> Result<PackedMatrix> {
    let cols = parts[0].shape()[1];
    let rows: usize = parts.iter().map(|w| w.shape()[0]).sum();
    let raws = parts
        .iter()
        .map(|w| match w {
            Weight::Quantized(q) => Ok(Some((q.dtype(), q.data()?.into_owned()))),
            Weight::Dense(_) => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let four_bit: Option<Vec<FourBit<'_>>> = raws
        .iter()
        .map(|raw| match raw {
            Some((GgmlDType::Q4_0, b)) => Some(FourBit::Q4_0(b)),
            Some((GgmlDType::Q4_1, b)) => Some(FourBit::Q4_1(b)),
            Some((GgmlDType::Q4K, b)) => Some(FourBit::Q4K(b)),
            _ => None,
        })
        .collect();
    if let Some(four_bit) = four_bit {
        return Ok(PackedMatrix::from_four_bit(&four_bit, cols));
    }
    if raws.iter().all(|r| matches!(r, Some((GgmlDType::Q8_0, _)))) {
        let raw: Vec<u8> = raws.into_iter().flatten().flat_map(|(_, b)| b).collect();
        return Ok(PackedMatrix::from_q8_0(&raw, rows, cols));
    }
    let mut dense = Vec::with_capacity(rows * cols);
    for w in parts {
        dense.extend(w.to_dense(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let all_dense_f32 = parts
        .iter()
        .all(|w| matches!(w, Weight::Dense(t) if t.dtype() == DType::F32));
    Ok(if all_dense_f32 || !cols.is_multiple_of(BLOCK) {
        PackedMatrix::from_f32(&dense, rows, cols)
    } else {
        PackedMatrix::quantize_f32(&dense, rows, cols)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::KvCache;
    use crate::model::loader::{build_model, random::RandomSource, WeightFormat};
    use crate::model::reversible::Seeding;

    fn tiny(format: WeightFormat, scheme: ReversibleConfig, separate_head: bool) -> Model {
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 50, "max_position_embeddings": 64,
            "tie_word_embeddings": !separate_head, "attention_bias": true
        }))
        .unwrap();
        let source = RandomSource {
            seed: 5,
            separate_head,
        };
        build_model(&config, scheme, &source, format, &Device::Cpu).unwrap()
    }

    /// The model with GGUF block weights as llama.cpp ships them: Q4_1 projections, a Q8_0
    /// embedding (and head).
    fn quantized(mut model: Model) -> Model {
        use candle_core::quantized::QTensor;
        let block = |w: &Weight, kind: GgmlDType| {
            let dense = w.to_dense(DType::F32).unwrap();
            Weight::Quantized(Arc::new(QTensor::quantize(&dense, kind).unwrap()))
        };
        for layer in &mut model.layers {
            for (_, lin) in layer.projections_mut() {
                *lin = Linear::new(block(&lin.weight, GgmlDType::Q4_1), lin.bias.clone()).unwrap();
            }
        }
        model.embed_tokens.weight = block(&model.embed_tokens.weight, GgmlDType::Q8_0);
        if let Some(head) = &mut model.lm_head {
            *head = Linear::new(block(&head.weight, GgmlDType::Q8_0), None).unwrap();
        }
        model
    }

    fn schemes() -> Vec<ReversibleConfig> {
        let mut seeded = ReversibleConfig::parse("midpoint(a=-0.5)").unwrap();
        seeded.seeding = Seeding::EulerStep;
        seeded.readout = Readout::Mean;
        let mut other = ReversibleConfig::parse("leapfrog(h=0.5)").unwrap();
        other.readout = Readout::Other;
        ["euler", "midpoint(h=0.5)", "hamiltonian(h=0.5)"]
            .iter()
            .map(|s| ReversibleConfig::parse(s).unwrap())
            .chain([seeded, other])
            .collect()
    }

    /// Prefill of two sequences of different lengths in one step, then batched and single
    /// decode steps; each step's logits from both paths.
    fn steps(model: &Model, packed: Option<(&PackedDecoder, &Team)>) -> Vec<Vec<Vec<f32>>> {
        let mut caches = [KvCache::new(&model.config), KvCache::new(&model.config)];
        let plan: [&[&[u32]]; 4] = [
            &[&[1, 7, 3, 9, 4], &[2, 8, 8]],
            &[&[5], &[6]],
            &[&[11], &[12]],
            &[&[13]],
        ];
        plan.iter()
            .map(|tokens| {
                let mut inputs: Vec<SeqInput<'_>> = caches
                    .iter_mut()
                    .zip(tokens.iter())
                    .map(|(cache, tokens)| SeqInput { tokens, cache })
                    .collect();
                let logits = match packed {
                    Some((p, team)) => {
                        p.forward_step(&mut inputs, &model.reversible, LogitRows::Last, team)
                    }
                    None => model.forward_step_tensors(&mut inputs, LogitRows::Last),
                };
                logits.unwrap().to_vec2::<f32>().unwrap()
            })
            .collect()
    }

    #[test]
    fn packed_steps_match_the_tensor_path_for_every_scheme() {
        let team = Team::new(2);
        for scheme in schemes() {
            for separate_head in [false, true] {
                let model = tiny(WeightFormat::F32, scheme.clone(), separate_head);
                let expected = steps(&model, None);
                for isa in Isa::usable() {
                    let packed = PackedDecoder::build(&model).unwrap().unwrap().with_isa(isa);
                    let got = steps(&model, Some((&packed, &team)));
                    for (step, (g, e)) in got.iter().zip(&expected).enumerate() {
                        for (gr, er) in g.iter().zip(e) {
                            let diff = gr
                                .iter()
                                .zip(er)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f32::max);
                            assert!(
                                diff < 2e-4,
                                "{} {isa:?} step {step}: max diff {diff}",
                                scheme.label()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Largest |a - b| over every logit, relative to the largest |b|.
    fn relative_error(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
        let (a, b) = (a.iter().flatten().flatten(), b.iter().flatten().flatten());
        let (diff, scale) = a.zip(b).fold((0.0f32, 0.0f32), |(d, s), (x, y)| {
            (d.max((x - y).abs()), s.max(y.abs()))
        });
        diff / scale
    }

    /// Block weights through the packed 8-bit kernels stay as close to the same weights
    /// computed densely in f32 as candle's own quantized products do.
    #[test]
    fn quantized_packed_steps_are_as_accurate_as_the_tensor_path() {
        let team = Team::new(2);
        for scheme in schemes() {
            let model = quantized(tiny(WeightFormat::F32, scheme.clone(), true));
            let mut dense = model.clone();
            dense.densify().unwrap();
            let exact = steps(&dense, None);
            let tensors = relative_error(&steps(&model, None), &exact);
            let packed = PackedDecoder::build(&model).unwrap().unwrap();
            let packed = relative_error(&steps(&model, Some((&packed, &team))), &exact);
            assert!(
                packed <= 1.5 * tensors + 1e-3 && packed < 0.02,
                "{}: packed error {packed}, tensor path {tensors}",
                scheme.label()
            );
        }
    }

    #[test]
    fn logits_do_not_depend_on_batch_or_threads() {
        let scheme = ReversibleConfig::parse("midpoint").unwrap();
        let model = quantized(tiny(WeightFormat::F32, scheme, false));
        let packed = PackedDecoder::build(&model).unwrap().unwrap();
        let batched = steps(&model, Some((&packed, &Team::new(2))));
        // The second sequence alone, on one thread.
        let mut cache = KvCache::new(&model.config);
        for (step, tokens) in [&[2u32, 8, 8][..], &[6], &[12]].iter().enumerate() {
            let logits = packed
                .forward_step(
                    &mut [SeqInput {
                        tokens,
                        cache: &mut cache,
                    }],
                    &model.reversible,
                    LogitRows::Last,
                    &Team::single(),
                )
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(logits[0], batched[step][1], "step {step}");
        }
    }

    #[test]
    fn every_position_gets_the_tensor_paths_logits() {
        let model = tiny(
            WeightFormat::F32,
            ReversibleConfig::parse("midpoint").unwrap(),
            false,
        );
        let packed = PackedDecoder::build(&model).unwrap().unwrap();
        let every = |packed: Option<&PackedDecoder>| {
            let (mut a, mut b) = (KvCache::new(&model.config), KvCache::new(&model.config));
            let mut inputs = [
                SeqInput {
                    tokens: &[3, 1, 4, 1, 5],
                    cache: &mut a,
                },
                SeqInput {
                    tokens: &[9, 2],
                    cache: &mut b,
                },
            ];
            let logits = match packed {
                Some(p) => p.forward_step(
                    &mut inputs,
                    &model.reversible,
                    LogitRows::Every,
                    &Team::single(),
                ),
                None => model.forward_step_tensors(&mut inputs, LogitRows::Every),
            };
            logits.unwrap().to_vec2::<f32>().unwrap()
        };
        let (got, want) = (every(Some(&packed)), every(None));
        assert_eq!(got.len(), 7);
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 2e-4, "{g} vs {w}");
        }
    }

    #[test]
    fn unsupported_models_stay_on_the_tensor_path() {
        let mut model = tiny(WeightFormat::F32, ReversibleConfig::euler(), false);
        assert!(model.pack_for_decoding().unwrap());
        model.add_lora(2, 4.0, &["q_proj".to_string()], 1).unwrap();
        assert!(
            model.packed.is_none(),
            "changing weights drops the packed copy"
        );
        assert!(!model.pack_for_decoding().unwrap());
        let bf16 = tiny(WeightFormat::Bf16, ReversibleConfig::euler(), false);
        assert!(PackedDecoder::build(&bf16).unwrap().is_none());
    }
}
