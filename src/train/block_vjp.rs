//! The decoder block's vector-Jacobian products, written by hand.
//!
//! Under autograd a block's backward costs several times its forward: every op's gradient is
//! accumulated into a freshly zeroed buffer, transposed weights are copied, and each elementwise
//! op is its own pass. Here each branch runs forward with the model's own kernels (so its value
//! is bit-identical to the forward pass, which the exact reversible mode relies on) while keeping
//! the few intermediates its backward needs, then the backward is the matmuls and fused kernels
//! of the chain rule, writing parameter gradients straight into the step's accumulator. Frozen
//! weights (LoRA or norms-only training) get no weight-gradient matmul at all.
//!
//! Checked against autograd through the same block by the gradient tests (store vs reversible).

use crate::model::attention::CausalAttention;
use crate::model::block::{mlp_tiles, BlockCtx, Layout};
use crate::model::linear::{Linear, Weight};
use crate::model::matmul::matmul;
use crate::model::{block::Block, ops};
use crate::train::grads::Grads;
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Where a backward pass files its parameter gradients.
pub struct Sink<'a> {
    pub trainable: &'a Trainable,
    pub grads: &'a mut Grads,
}

impl Sink<'_> {
    /// Adds `grad` (any dtype) to `param`'s gradient if `param` is trained.
    fn add(
        &mut self,
        param: &Tensor,
        grad: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        if let Some(i) = self.trainable.var_of(param) {
            self.grads.add_at(i, grad()?.to_dtype(param.dtype())?)?;
        }
        Ok(())
    }

    fn is_trained(&self, param: &Tensor) -> bool {
        self.trainable.var_of(param).is_some()
    }
}

/// dL/dx of y = x W^T + b + s (x A^T) B^T for the output cotangent `dy`, filing the gradients of
/// W, b, A and B. x and dy are (N, in) and (N, out) in the compute dtype.
fn linear_backward(lin: &Linear, x: &Tensor, dy: &Tensor, sink: &mut Sink<'_>) -> Result<Tensor> {
    let Weight::Dense(w) = &lin.weight else {
        bail!("training needs dense weights (quantized weights are densified first)");
    };
    let mut dx = matmul(dy, &w.to_dtype(dy.dtype())?)?;
    sink.add(w, || matmul(&dy.t()?, x))?;
    if let Some(b) = &lin.bias {
        sink.add(b, || dy.sum(0))?;
    }
    if let Some(l) = &lin.lora {
        let a = l.a.to_dtype(x.dtype())?;
        let du = (matmul(dy, &l.b.to_dtype(dy.dtype())?)? * l.scale)?;
        if sink.is_trained(&l.b) {
            let u = matmul(x, &a.t()?)?;
            sink.add(&l.b, || matmul(&dy.t()?, &u)? * l.scale)?;
        }
        sink.add(&l.a, || matmul(&du.t()?, x))?;
        dx = (dx + matmul(&du, &a)?)?;
    }
    Ok(dx)
}

/// What the attention branch's backward needs from its forward.
pub struct AttentionTape {
    /// The branch's input; N1 p, which the projections' backward reads, is recomputed from it
    /// (bit for bit) rather than kept through the kernel's backward.
    p: Tensor,
    /// Rotated heads as the kernel saw them.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: CausalAttention,
    /// Each query row's log-sum-exp, when the tiled kernel ran.
    lse: Option<Tensor>,
    /// The kernel's output as rows, the input of o_proj.
    merged: Tensor,
    batch: usize,
    seq: usize,
}

/// Attn(N1 p) for `batch` sequences of `seq` tokens, with its tape.
pub fn attention_forward(
    block: &Block,
    p: &Tensor,
    batch: usize,
    seq: usize,
    ctx: &BlockCtx<'_>,
) -> Result<(Tensor, AttentionTape)> {
    let attn = &block.self_attn;
    // Scoped so N1 p, the projections' row layout and the kernel's output layout are freed as
    // soon as what follows from them exists.
    let (q, k, v) = {
        let (q, k, v) = attn.project(&block.attention_input(p, ctx)?)?;
        attn.split_heads(&q, &k, &v, batch, seq, 0, ctx)?
    };
    let kernel = attn.kernel(&q, seq, 0, ctx);
    let (merged, lse) = {
        let (out, lse) = kernel.forward_with_stats(&q, &k, &v)?;
        (attn.merge_heads(&out, batch, seq)?, lse)
    };
    let y = attn.o_proj.forward(&merged)?.to_dtype(ctx.residual_dtype)?;
    let tape = AttentionTape {
        p: p.clone(),
        q,
        k,
        v,
        kernel,
        lse,
        merged,
        batch,
        seq,
    };
    Ok((y, tape))
}

/// dL/dp of the attention branch for the output cotangent `dy` (residual dtype), taken by
/// value: it is freed once o_proj's backward has used it, before the kernel's.
pub fn attention_backward(
    block: &Block,
    tape: AttentionTape,
    dy: Tensor,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<Tensor> {
    let attn = &block.self_attn;
    let (b, t, dh) = (tape.batch, tape.seq, attn.head_dim);
    let (h, kvh) = (attn.num_heads, attn.num_kv_heads);
    let d_merged = {
        let owned = dy;
        let dy = owned.to_dtype(ctx.compute_dtype)?;
        linear_backward(&attn.o_proj, &tape.merged, &dy, sink)?
    };
    // The tiled kernel's backward needs rowsum(d_out * out) per query row: summed here over
    // each head's slice of the rows, then laid out as the kernel's (B*KvH, rep*T).
    let delta = match &tape.lse {
        Some(_) => Some(
            (&d_merged * &tape.merged)?
                .reshape((b, t, h, dh))?
                .sum(3)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * kvh, (h / kvh) * t))?,
        ),
        None => None,
    };
    drop(tape.merged);
    // Rows (N, H*Dh) to the kernel's stacked layout (B, KvH, rep*T, Dh).
    let d_out = d_merged
        .reshape((b, t, h, dh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, kvh, (h / kvh) * t, dh))?;
    drop(d_merged);
    let saved = tape.lse.as_ref().zip(delta.as_ref());
    let (dq, dk, dv) = tape
        .kernel
        .backward(&tape.q, &tape.k, &tape.v, &d_out, saved)?;
    // What the rest needs is N1 p and the three cotangents: every other full-width tensor goes
    // before the projections' backward allocates its own (a block's working set is what
    // bounds the batch).
    drop((d_out, tape.q, tape.k, tape.v));
    let (cos, sin) = ctx.rope.slice(0, t)?;
    let rows = |g: Tensor, n: usize| -> Result<Tensor> {
        Ok(g.reshape((b, n, t, dh))?
            .transpose(1, 2)?
            .reshape((b * t, n * dh))?)
    };
    let x = block.attention_input(&tape.p, ctx)?;
    let dx = linear_backward(
        &attn.q_proj,
        &x,
        &rows(
            ops::rope_transpose(&dq.reshape((b, h, t, dh))?, &cos, &sin)?,
            h,
        )?,
        sink,
    )?;
    drop(dq);
    let dx = (dx
        + linear_backward(
            &attn.k_proj,
            &x,
            &rows(ops::rope_transpose(&dk, &cos, &sin)?, kvh)?,
            sink,
        )?)?;
    drop(dk);
    let dx = (dx + linear_backward(&attn.v_proj, &x, &rows(dv, kvh)?, sink)?)?;
    drop(x);
    norm_backward(
        &block.input_layernorm,
        block.rms_norm_eps,
        &tape.p,
        &dx,
        sink,
    )
}

/// What the MLP branch's backward needs from its forward.
pub struct MlpTape {
    q: Tensor,
    /// N2 q in the compute dtype.
    x: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// MLP(N2 q) and dL/dq for the branch's output cotangent `dy` (hamiltonian's half-step).
pub fn mlp_value_and_vjp(
    block: &Block,
    q: &Tensor,
    dy: &Tensor,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<(Tensor, Tensor)> {
    let value = Tensor::zeros(q.shape(), ctx.residual_dtype, q.device())?;
    let d_q = mlp_tiles_vjp(
        block,
        q.dim(0)?,
        |r0, len| Ok(q.narrow(0, r0, len)?),
        |r0, m| Ok(value.slice_set(&m, 0, r0)?),
        dy,
        ctx,
        sink,
    )?;
    Ok((value, d_q))
}

/// The block's value a + MLP(N2 (p + a)) from the attention output `a`, written into `a`'s
/// own buffer, and dL/d(p + a) for the cotangent `dy` of the MLP's output.
pub fn block_value_and_mlp_vjp(
    block: &Block,
    p: &Tensor,
    a: Tensor,
    dy: &Tensor,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<(Tensor, Tensor)> {
    let a = a.contiguous()?;
    let d_input = mlp_tiles_vjp(
        block,
        p.dim(0)?,
        |r0, len| Ok((p.narrow(0, r0, len)? + a.narrow(0, r0, len)?)?),
        |r0, m| {
            let f = (a.narrow(0, r0, m.dim(0)?)? + m)?;
            Ok(a.slice_set(&f, 0, r0)?)
        },
        dy,
        ctx,
        sink,
    )?;
    Ok((a, d_input))
}

/// The MLP branch over the same row tiles as `Block::mlp_branch` (so its value is bit-identical
/// to the forward pass): each tile's input from `input(first row, rows)`, its output handed to
/// `value(first row, output)`, its input cotangent written into the returned buffer. A tile's
/// intermediates live only while its own backward runs, and no full-width MLP input, output or
/// list of tiles ever exists.
fn mlp_tiles_vjp(
    block: &Block,
    rows: usize,
    input: impl Fn(usize, usize) -> Result<Tensor>,
    mut value: impl FnMut(usize, Tensor) -> Result<()>,
    dy: &Tensor,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<Tensor> {
    let mut d_input: Option<Tensor> = None;
    for (r0, len) in mlp_tiles(rows) {
        let x = input(r0, len)?;
        let (m, tape) = mlp_forward(block, &x, ctx)?;
        drop(x);
        value(r0, m)?;
        let d = mlp_backward(block, tape, &dy.narrow(0, r0, len)?, ctx, sink)?.contiguous()?;
        let buffer = match &d_input {
            Some(b) => b,
            None => d_input.insert(Tensor::zeros((rows, d.dim(1)?), d.dtype(), d.device())?),
        };
        buffer.slice_set(&d, 0, r0)?;
    }
    d_input.ok_or_else(|| anyhow::anyhow!("an MLP over no rows"))
}

/// MLP(N2 q) for one tile of rows, with its tape.
fn mlp_forward(block: &Block, q: &Tensor, ctx: &BlockCtx<'_>) -> Result<(Tensor, MlpTape)> {
    let mlp = &block.mlp;
    let x = block.mlp_input(q, ctx)?;
    let (gate, up) = mlp.gate_and_up(&x)?;
    let act = ops::swiglu(&gate, &up)?;
    let y = mlp.down_proj.forward(&act)?.to_dtype(ctx.residual_dtype)?;
    let tape = MlpTape {
        q: q.clone(),
        x,
        gate,
        up,
        act,
    };
    Ok((y, tape))
}

/// dL/dq of one tile of the MLP branch for the output cotangent `dy` (residual dtype).
fn mlp_backward(
    block: &Block,
    tape: MlpTape,
    dy: &Tensor,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<Tensor> {
    let mlp = &block.mlp;
    let dy = dy.to_dtype(ctx.compute_dtype)?;
    let d_act = linear_backward(&mlp.down_proj, &tape.act, &dy, sink)?;
    drop(tape.act);
    let (d_gate, d_up) = ops::swiglu_vjp(&tape.gate, &tape.up, &d_act)?;
    let dx = linear_backward(&mlp.gate_proj, &tape.x, &d_gate, sink)?;
    let dx = (dx + linear_backward(&mlp.up_proj, &tape.x, &d_up, sink)?)?;
    norm_backward(
        &block.post_attention_layernorm,
        block.rms_norm_eps,
        &tape.q,
        &dx,
        sink,
    )
}

/// Through the RMSNorm in front of a branch: dx (compute dtype) to the residual state's
/// cotangent, filing the gain's gradient.
fn norm_backward(
    gain: &Tensor,
    eps: f64,
    input: &Tensor,
    dx: &Tensor,
    sink: &mut Sink<'_>,
) -> Result<Tensor> {
    let dx = dx.to_dtype(input.dtype())?;
    let (d_input, d_gain) = ops::rms_norm_vjp(input, gain, eps, &dx)?;
    sink.add(gain, || Ok(d_gain))?;
    Ok(d_input)
}

/// f(p) = Attn(N1 p) + MLP(N2 (p + Attn(N1 p))) and dL/dp for the cotangent `df` of f(p).
/// One evaluation of the block serves both, as the reversible walk needs.
pub fn f_and_vjp(
    block: &Block,
    p: &Tensor,
    df: Tensor,
    layout: &Layout<'_>,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<(Tensor, Tensor)> {
    let half = f_and_mlp_vjp(block, p, &df, layout, ctx, sink)?;
    // Taken by value: df is not needed past here.
    let d_a = (df + &half.d_mlp)?;
    let d_p = (half.d_mlp + attention_backward(block, half.attention, d_a, ctx, sink)?)?;
    Ok((half.f, d_p))
}

/// The block's value and the part of its VJP that needs no attention backward.
pub struct BlockHalf {
    /// f(p).
    pub f: Tensor,
    /// The cotangent reaching the MLP's input p + a: part of dL/dp, and (with df) the
    /// attention output's cotangent.
    pub d_mlp: Tensor,
    /// What the attention branch's backward needs ([`attention_backward`] with cotangent
    /// df + d_mlp).
    pub attention: AttentionTape,
}

/// f(p) and the MLP's VJP for the cotangent `df` of f(p), stopping before the attention
/// backward, so a caller can spend f (the reversible walk rebuilds the state below with it) and
/// combine its cotangents before the attention backward's working set is allocated.
pub fn f_and_mlp_vjp(
    block: &Block,
    p: &Tensor,
    df: &Tensor,
    layout: &Layout<'_>,
    ctx: &BlockCtx<'_>,
    sink: &mut Sink<'_>,
) -> Result<BlockHalf> {
    let (batch, seq) = uniform(layout)?;
    let (a, attention) = attention_forward(block, p, batch, seq, ctx)?;
    // f = a + m(p + a): the cotangent reaching p + a is the MLP's, and a receives df plus it.
    let (f, d_mlp) = block_value_and_mlp_vjp(block, p, a, df, ctx, sink)?;
    Ok(BlockHalf {
        f,
        d_mlp,
        attention,
    })
}

/// The batch and sequence length of a training layout.
pub fn uniform(layout: &Layout<'_>) -> Result<(usize, usize)> {
    match layout {
        Layout::Uniform { batch, seq } => Ok((*batch, *seq)),
        Layout::Ragged(_) => bail!("the hand-written block backward takes uniform batches"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::decoder::Model;
    use crate::model::loader::{build_model, random::RandomSource, WeightFormat};
    use crate::model::reversible::ReversibleConfig;
    use candle_core::{DType, Device, Var};

    /// A one-layer Qwen2-style model in f64 (q/k/v biases, grouped-query heads) with LoRA
    /// adapters on every projection whose B factors are non-zero, so every term of
    /// `linear_backward` is exercised.
    fn tiny() -> Model {
        let dev = Device::Cpu;
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 30, "max_position_embeddings": 512, "tie_word_embeddings": true,
            "attention_bias": true
        }))
        .unwrap();
        let source = RandomSource {
            seed: 3,
            separate_head: false,
        };
        let mut model = build_model(
            &config,
            ReversibleConfig::euler(),
            &source,
            WeightFormat::F32,
            &dev,
        )
        .unwrap();
        model.to_precision(DType::F64).unwrap();
        for (i, (_, lin)) in model.layers[0].projections_mut().into_iter().enumerate() {
            lin.add_lora(2, 3.0, i as u64).unwrap();
            let lora = lin.lora.as_mut().unwrap();
            lora.a = lora.a.to_dtype(DType::F64).unwrap();
            lora.b = Tensor::randn(0f64, 0.1, lora.b.shape(), &dev).unwrap();
        }
        model
    }

    /// The hand-written f(p) and its VJP against candle's autograd through `Block::f`: the
    /// value bit for bit, the input and every trained parameter's gradient to 1e-12.
    fn check(train: impl Fn(&str) -> bool, (batch, seq): (usize, usize)) {
        let t = Trainable::new(tiny(), train).unwrap();
        let dev = Device::Cpu;
        let p = Tensor::randn(0f64, 1.0, (batch * seq, 16), &dev).unwrap();
        let df = Tensor::randn(0f64, 1.0, (batch * seq, 16), &dev).unwrap();
        let layout = Layout::Uniform { batch, seq };

        let mut grads = Grads::new(t.vars.len());
        let mut sink = Sink {
            trainable: &t,
            grads: &mut grads,
        };
        let ctx = t.frozen.ctx();
        let (f, dp) = f_and_vjp(
            &t.frozen.layers[0],
            &p,
            df.clone(),
            &layout,
            &ctx,
            &mut sink,
        )
        .unwrap();

        let p_var = Var::from_tensor(&p).unwrap();
        let reference = t.graph.layers[0]
            .f(
                p_var.as_tensor(),
                &mut Layout::Uniform { batch, seq },
                &t.graph.ctx(),
            )
            .unwrap();
        let store = (&reference * &df)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let bits = |x: &Tensor| -> Vec<u64> {
            let v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v.into_iter().map(f64::to_bits).collect()
        };
        assert_eq!(bits(&f), bits(&reference), "f(p) differs from the forward");
        let rel = |a: &Tensor, b: &Tensor| {
            let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            let den = b.sqr().unwrap().sum_all().unwrap();
            (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap()).sqrt()
        };
        let want_dp = store.get(p_var.as_tensor()).unwrap();
        assert!(rel(&dp, want_dp) < 1e-12, "dp: {:e}", rel(&dp, want_dp));
        for (i, (name, var)) in t.names.iter().zip(&t.vars).enumerate() {
            let Some(want) = store.get(var.as_tensor()) else {
                assert!(grads.grads[i].is_none(), "{name}: gradient without a path");
                continue;
            };
            let got = grads.grads[i]
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(rel(got, want) < 1e-12, "{name}: {:e}", rel(got, want));
        }
    }

    #[test]
    fn matches_autograd_with_every_parameter_trained() {
        check(|_| true, (2, 5));
    }

    /// 600 rows: the MLP runs over two tiles (512 + 88 rows), forward and backward alike.
    #[test]
    fn matches_autograd_across_mlp_tiles() {
        check(|_| true, (2, 300));
    }

    /// LoRA-style training: frozen projections get no gradient, adapters and norms do.
    #[test]
    fn matches_autograd_with_frozen_projections() {
        check(
            |name| name.contains("lora") || name.contains("norm"),
            (2, 5),
        );
    }
}
