//! Loss and parameter gradients of one batch under three backward strategies:
//!
//! - `store`: ordinary autograd through the whole stack (every activation kept);
//! - `checkpoint`: keep each layer's input pair; walking down, re-evaluate each block from it
//!   for its vector-Jacobian product;
//! - `reversible`: keep only the top pair; walking down, one evaluation of each block serves
//!   both the rebuild of the states below (the scheme's inverse) and its vector-Jacobian
//!   product. Activation memory is one block's working set plus two states, whatever the depth.
//!
//! The two memory-light strategies differentiate blocks by hand (`block_vjp`); `store`, the
//! reference they are tested against, uses autograd.
//!
//! For p_{j+1} = A p_{j-1} + B p_j + C f_j(p_j) the adjoints are
//!     g_j     += B g_{j+1} + VJP(f_j, p_j, C g_{j+1})
//!     g_{j-1}  = A g_{j+1}
//! and for hamiltonian each half-step is undone in reverse order with its own VJP.

use crate::memory::phases;
use crate::model::block::Layout;
use crate::model::decoder::States;
use crate::model::reversible::scaled;
use crate::train::block_vjp::{self, Sink};
use crate::train::exact::{self, ExactRule, FixedPoint};
use crate::train::grads::{grad_or_zeros, Grads};
use crate::train::loss::{chunked_head_loss, Objective, Targets};
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use std::cell::RefCell;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Store,
    Checkpoint,
    Reversible,
}

/// A batch of `batch` sequences of `seq` tokens.
pub struct Batch<'a> {
    /// Input ids, (B, T) u32.
    pub inputs: Tensor,
    pub targets: Targets,
    pub objective: Objective<'a>,
}

/// Result of one forward + backward.
pub struct StepGrads {
    /// Weighted mean loss.
    pub loss: f64,
    pub grads: Grads,
    /// dLoss/d(embedding output), (N, d): the input gradient, for tests.
    pub grad_embedding: Tensor,
}

/// Rows of the LM head computed at once.
pub const HEAD_CHUNK_ROWS: usize = 256;

/// Cotangents of the two carried states.
struct Adjoint {
    other: Tensor,
    last: Tensor,
}

/// sum(a * b) over all elements, the scalar whose backward is a VJP with cotangent b.
fn dot(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a * b)?.sum_all()
}

/// How the walk down the stack gets the states below each layer.
enum Below<'a> {
    /// Float states, rebuilt by the scheme's inverse.
    Float,
    /// Float states the forward kept (the checkpoint strategy), one input pair per layer in
    /// order; the walk down takes (and so frees) each as it reaches its layer.
    Kept(RefCell<Vec<States>>),
    /// Fixed-point states: rebuilt bit-exactly, or (`stored`) looked up, which is the
    /// stored-activation reference the rebuild must match bit for bit.
    Exact {
        fp: FixedPoint,
        bits: Vec<Option<Tensor>>,
        stored: Option<Vec<States>>,
        _marker: std::marker::PhantomData<&'a ()>,
    },
}

impl Below<'_> {
    /// What a block sees of a carried state.
    fn view(&self, x: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        match self {
            Below::Float | Below::Kept(_) => Ok(x.clone()),
            Below::Exact { fp, .. } => fp.view(x, dtype),
        }
    }
}

/// Loss and gradients of `batch`; `normalizer` divides the summed token losses (the number of
/// trained tokens across the whole accumulated step). With `exact`, the residual streams are
/// fixed point: `reversible` rebuilds them bit-exactly, `store`/`checkpoint` keep every layer's
/// integer input pair instead (the reference the rebuild must match bit for bit).
pub fn loss_and_grads(
    t: &Trainable,
    batch: &Batch,
    strategy: Strategy,
    normalizer: f64,
    exact: Option<FixedPoint>,
) -> Result<StepGrads> {
    if let Some(fp) = exact {
        return exact_loss_and_grads(t, batch, strategy == Strategy::Reversible, normalizer, fp);
    }
    if strategy == Strategy::Reversible && !t.graph.reversible.is_reversible() {
        bail!("the `reversible` strategy needs a reversible scheme; `euler` (the original network) cannot rebuild its states: use `store` or `checkpoint`, or convert the model to a reversible scheme first");
    }
    let (batch_size, seq) = batch.inputs.dims2()?;
    let layout = || Layout::Uniform {
        batch: batch_size,
        seq,
    };
    let ids = batch.inputs.flatten_all()?;
    let mut grads = Grads::new(t.vars.len());
    let e = t.frozen.embed(&ids)?;
    let first = t.graph.reversible.first_scheme_layer();

    // Forward to the top pair; `store` keeps the graph, the others keep what they need.
    let (top, graph_top, inputs) = match strategy {
        Strategy::Store => {
            let e_var = Var::from_tensor(&e)?;
            let s = t.graph.run_stack(e_var.as_tensor(), &mut layout())?;
            (
                States {
                    other: s.other.detach(),
                    last: s.last.detach(),
                },
                Some((e_var, s)),
                Vec::new(),
            )
        }
        Strategy::Checkpoint => {
            let mut s = t.frozen.seed(&e, &mut layout())?;
            let mut inputs = Vec::with_capacity(t.frozen.layers.len());
            for j in first..t.frozen.layers.len() {
                inputs.push(s.clone());
                s = t.frozen.step(j, &s, &mut layout())?;
            }
            (s, None, inputs)
        }
        Strategy::Reversible => (t.frozen.run_stack(&e, &mut layout())?, None, Vec::new()),
    };
    phases::mark(e.device(), "forward")?;

    let (loss, mut g) = head_adjoint(t, &top, batch, normalizer, &mut grads)?;
    phases::mark(e.device(), "head")?;

    // Down the stack to the cotangent of the seed states.
    let g_seed = match strategy {
        Strategy::Store => {
            let (e_var, s) = graph_top.expect("store keeps its graph");
            let store = (dot(&s.other, &g.other)? + dot(&s.last, &g.last)?)?.backward()?;
            grads.absorb(&store, &t.vars)?;
            let g_e = grad_or_zeros(&store, e_var.as_tensor())?;
            return finish_embedding(t, &ids, g_e, loss, grads);
        }
        Strategy::Checkpoint | Strategy::Reversible => {
            let below = match strategy {
                Strategy::Checkpoint => Below::Kept(RefCell::new(inputs)),
                _ => Below::Float,
            };
            let mut s = top;
            for j in (first..t.graph.layers.len()).rev() {
                (s, g) = reversible_layer(t, j, s, g, &layout(), &mut grads, &below)?;
            }
            phases::mark(e.device(), "walk down")?;
            g
        }
    };

    // Through the seeding to the embedding: both states are e, or under `EulerStep` the pair
    // (e, e + f_0(e)), whose block is differentiated by hand like the others.
    let g_e = (&g_seed.other + &g_seed.last)?;
    let g_e = if first == 1 {
        let mut sink = Sink {
            trainable: t,
            grads: &mut grads,
        };
        let block = &t.frozen.layers[0];
        let ctx = t.frozen.ctx();
        let (_, d_e) =
            block_vjp::f_and_vjp(block, &e, g_seed.last.clone(), &layout(), &ctx, &mut sink)?;
        (g_e + d_e)?
    } else {
        g_e
    };
    finish_embedding(t, &ids, g_e, loss, grads)
}

/// Exact mode: fixed-point forward, then the reversible walk with bit-exact rebuilds (or, as
/// the reference, with every layer's stored integer states).
fn exact_loss_and_grads(
    t: &Trainable,
    batch: &Batch,
    rebuild: bool,
    normalizer: f64,
    fp: FixedPoint,
) -> Result<StepGrads> {
    let (batch_size, seq) = batch.inputs.dims2()?;
    let layout = || Layout::Uniform {
        batch: batch_size,
        seq,
    };
    let ids = batch.inputs.flatten_all()?;
    let mut grads = Grads::new(t.vars.len());
    let e = t.frozen.embed(&ids)?;
    let dtype = t.graph.residual_dtype;
    let fwd = exact::forward(&t.frozen, &fp, &e, &mut layout(), !rebuild)?;
    let below = Below::Exact {
        fp,
        bits: fwd.bits,
        stored: (!rebuild).then_some(fwd.stored),
        _marker: std::marker::PhantomData,
    };

    let top = States {
        other: fp.view(&fwd.top.other, dtype)?,
        last: fp.view(&fwd.top.last, dtype)?,
    };
    phases::mark(e.device(), "forward")?;
    let (loss, mut g) = head_adjoint(t, &top, batch, normalizer, &mut grads)?;
    phases::mark(e.device(), "head")?;
    let mut s = fwd.top;
    for j in (0..t.graph.layers.len()).rev() {
        (s, g) = reversible_layer(t, j, s, g, &layout(), &mut grads, &below)?;
    }
    phases::mark(e.device(), "walk down")?;
    // Duplicate seeding: both states are the embedding.
    let g_e = (g.other + g.last)?;
    finish_embedding(t, &ids, g_e, loss, grads)
}

/// Read-out and the chunked head on the top pair of states: the loss, the head's parameter
/// gradients (into `grads`) and the cotangents of the top pair.
fn head_adjoint(
    t: &Trainable,
    top: &States,
    batch: &Batch,
    normalizer: f64,
    grads: &mut Grads,
) -> Result<(f64, Adjoint)> {
    let (other, last) = (Var::from_tensor(&top.other)?, Var::from_tensor(&top.last)?);
    let hidden = t.graph.read_out(&States {
        other: other.as_tensor().clone(),
        last: last.as_tensor().clone(),
    })?;
    let head = chunked_head_loss(
        &t.graph,
        &t.vars,
        &hidden.detach(),
        &batch.targets,
        &batch.objective,
        normalizer,
        HEAD_CHUNK_ROWS,
        grads,
    )?;
    let store = dot(&hidden, &head.grad_hidden)?.backward()?;
    let g = Adjoint {
        other: grad_or_zeros(&store, other.as_tensor())?,
        last: grad_or_zeros(&store, last.as_tensor())?,
    };
    Ok((head.loss, g))
}

/// Backward through the embedding lookup.
fn finish_embedding(
    t: &Trainable,
    ids: &Tensor,
    g_e: Tensor,
    loss: f64,
    mut grads: Grads,
) -> Result<StepGrads> {
    let store = dot(&t.graph.embed(ids)?, &g_e)?.backward()?;
    grads.absorb(&store, &t.vars)?;
    Ok(StepGrads {
        loss,
        grads,
        grad_embedding: g_e,
    })
}

/// Undoes layer j: rebuilds the pair below from the pair above and returns the cotangents of
/// the pair below. One block evaluation serves the rebuild and the VJP (both by hand, see
/// `block_vjp`).
fn reversible_layer(
    t: &Trainable,
    j: usize,
    s: States,
    g: Adjoint,
    layout: &Layout<'_>,
    grads: &mut Grads,
    below: &Below<'_>,
) -> Result<(States, Adjoint)> {
    let ctx = t.frozen.ctx();
    let block = &t.frozen.layers[j];
    let dtype = t.frozen.residual_dtype;
    let mut sink = Sink {
        trainable: t,
        grads,
    };
    let kept_input = match below {
        Below::Kept(inputs) => inputs.borrow_mut().pop(),
        _ => None,
    };
    let kept = || {
        kept_input
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no input pair kept for layer {j}"))
    };
    match t.frozen.reversible.two_step(j) {
        Some(coef) => {
            // s = (p_j, p_{j+1}), g = (g_j, g_{j+1}). The block's value f rebuilds p_{j-1}, and
            // every cotangent but the attention output's is combined, before the attention
            // backward runs: f, p_{j+1}, g_j, g_{j+1} and the MLP's cotangent are gone by the
            // time its working set is allocated.
            let States {
                other: p_j,
                last: p_next,
            } = s;
            let p = below.view(&p_j, dtype)?;
            let df = scaled(&g.last, coef.c)?;
            let half = block_vjp::f_and_mlp_vjp(block, &p, &df, layout, &ctx, &mut sink)?;
            let prev = match below {
                Below::Float => coef.inverse(&p_j, &p_next, &half.f)?,
                Below::Kept(_) => kept()?.other.clone(),
                Below::Exact {
                    stored: Some(stored),
                    ..
                } => stored[j].other.clone(),
                Below::Exact {
                    fp,
                    bits,
                    stored: None,
                    ..
                } => fp.two_step_inverse(
                    ExactRule::for_step(&coef)?,
                    coef.c,
                    &p_j,
                    &p_next,
                    &half.f,
                    bits[j].as_ref(),
                )?,
            };
            drop((half.f, p_next));
            let d_a = (df + &half.d_mlp)?;
            let g_p = ((g.other + half.d_mlp)? + scaled(&g.last, coef.b)?)?;
            let g_prev = g.last.affine(coef.a, 0.0)?;
            drop(g.last);
            let d_attention =
                block_vjp::attention_backward(block, half.attention, d_a, &ctx, &mut sink)?;
            Ok((
                States {
                    other: prev,
                    last: p_j,
                },
                Adjoint {
                    other: g_prev,
                    last: (g_p + d_attention)?,
                },
            ))
        }
        None => {
            // s = (q_j, p_j): undo p_j = p_{j-1} + h MLP(N2 q_j), then q_j = q_{j-1} + h Attn(N1 p_{j-1}).
            let h = t.frozen.reversible.h;
            let (batch, seq) = block_vjp::uniform(layout)?;
            let q = below.view(&s.other, dtype)?;
            let (m, d_q) =
                block_vjp::mlp_value_and_vjp(block, &q, &g.last.affine(h, 0.0)?, &ctx, &mut sink)?;
            let p_prev = match below {
                Below::Float => (&s.last - m.affine(h, 0.0)?)?,
                Below::Kept(_) => kept()?.last.clone(),
                Below::Exact {
                    stored: Some(stored),
                    ..
                } => stored[j].last.clone(),
                Below::Exact { fp, .. } => fp.hamiltonian_undo_mlp(h, &s.last, &m)?,
            };
            let g_q = (&g.other + d_q)?;

            let p = below.view(&p_prev, dtype)?;
            let (a, attn_tape) = block_vjp::attention_forward(block, &p, batch, seq, &ctx)?;
            let q_prev = match below {
                Below::Float => (&s.other - a.affine(h, 0.0)?)?,
                Below::Kept(_) => kept()?.other.clone(),
                Below::Exact {
                    stored: Some(stored),
                    ..
                } => stored[j].other.clone(),
                Below::Exact { fp, .. } => fp.hamiltonian_undo_attn(h, &s.other, &a)?,
            };
            let d_p = block_vjp::attention_backward(
                block,
                attn_tape,
                g_q.affine(h, 0.0)?,
                &ctx,
                &mut sink,
            )?;
            let g_p = (&g.last + d_p)?;
            Ok((
                States {
                    other: q_prev,
                    last: p_prev,
                },
                Adjoint {
                    other: g_q,
                    last: g_p,
                },
            ))
        }
    }
}
