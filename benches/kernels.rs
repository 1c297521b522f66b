//! The CPU training step's hot kernels, one by one: median milliseconds per call at the shapes
//! of `rewind bench train`'s synthetic decoder (d=512, 8 heads, SwiGLU 1,408, 8 x 64 tokens)
//! and an AdamW step over SmolLM2-135M's parameter count.
//!
//!     cargo bench --bench kernels
//!
//! Whole training steps are `rewind bench train`; this says which kernel a change moved.

use candle_core::{DType, Device, Tensor, Var};
use rewind::model::attention::CausalAttention;
use rewind::model::matmul::matmul;
use rewind::model::ops;
use rewind::model::rope::RopeTables;
use rewind::train::grads::Grads;
use rewind::train::optimizer::{AdamW, AdamWConfig};
use std::time::Instant;

/// Median milliseconds of `reps` calls after one warm-up call.
fn median_ms<E: std::fmt::Debug>(reps: usize, mut call: impl FnMut() -> Result<(), E>) -> f64 {
    call().expect("warm-up call");
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let started = Instant::now();
            call().expect("timed call");
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn report(kernel: &str, shape: &str, ms: f64) {
    println!("| {kernel} | {shape} | {ms:.3} |");
}

fn main() -> anyhow::Result<()> {
    rewind::memory::retain_freed_heap();
    let dev = Device::Cpu;
    let (tokens, d, inter, heads, seq) = (512, 512, 1408, 8, 64);
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    println!("| kernel | shape | median ms |\n|---|---|---|");

    let x = randn(&[tokens, d])?;
    let g = randn(&[tokens, d])?;
    for (name, out) in [("x W^T (q)", d), ("x W^T (up)", inter)] {
        let w = randn(&[out, d])?;
        let ms = median_ms(30, || matmul(&x, &w.t()?).map(drop));
        report(name, &format!("{tokens} x {d} x {out}"), ms);
    }

    let gain = Tensor::ones(d, DType::F32, &dev)?;
    let ms = median_ms(50, || ops::rms_norm(&x, &gain, 1e-5).map(drop));
    report("rms_norm", &format!("{tokens} x {d}"), ms);
    let ms = median_ms(50, || ops::rms_norm_vjp(&x, &gain, 1e-5, &g).map(drop));
    report("rms_norm backward", &format!("{tokens} x {d}"), ms);

    let (gate, up) = (randn(&[tokens, inter])?, randn(&[tokens, inter])?);
    let ms = median_ms(50, || ops::swiglu(&gate, &up).map(drop));
    report("swiglu", &format!("{tokens} x {inter}"), ms);
    let ms = median_ms(50, || ops::swiglu_vjp(&gate, &up, &gate).map(drop));
    report("swiglu backward", &format!("{tokens} x {inter}"), ms);

    let head_dim = d / heads;
    let rope = RopeTables::new(head_dim, 10_000.0, seq, &dev)?;
    let q = randn(&[tokens / seq, heads, seq, head_dim])?;
    let (cos, sin) = rope.slice(0, seq)?;
    let ms = median_ms(50, || ops::rope(&q, &cos, &sin).map(drop));
    report("rope", "8 x 8 x 64 x 64", ms);

    let scale = 1.0 / (head_dim as f64).sqrt();
    let attention = CausalAttention::new(seq, seq, 0, scale, DType::F32, &rope);
    let ms = median_ms(50, || attention.forward(&q, &q, &q).map(drop));
    report("attention", "8 x 8 x 64 x 64", ms);
    let ms = median_ms(50, || attention.backward(&q, &q, &q, &q, None).map(drop));
    report("attention backward", "8 x 8 x 64 x 64", ms);
    // One sequence at long context, where the tiles matter.
    let long = 1024;
    let rope = RopeTables::new(head_dim, 10_000.0, long, &dev)?;
    let q = randn(&[1, heads, long, head_dim])?;
    let attention = CausalAttention::new(long, long, 0, scale, DType::F32, &rope);
    let ms = median_ms(10, || attention.forward(&q, &q, &q).map(drop));
    report("attention", "1 x 8 x 1024 x 64", ms);
    let ms = median_ms(10, || attention.backward(&q, &q, &q, &q, None).map(drop));
    report("attention backward", "1 x 8 x 1024 x 64", ms);

    // SmolLM2-135M's parameter count in 100 tensors.
    let (tensors, size) = (100, 1_350_000);
    let vars = (0..tensors)
        .map(|_| Var::from_tensor(&randn(&[size])?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grads = Grads {
        grads: (0..tensors)
            .map(|_| randn(&[size]).map(Some))
            .collect::<candle_core::Result<_>>()?,
    };
    let ms = median_ms(5, || grads.global_norm().map(drop));
    report("gradient norm", "135M", ms);
    let mut adamw = AdamW::new(AdamWConfig::default(), &vars)?;
    let ms = median_ms(5, || adamw.update(&vars, &grads, 1e-4).map(drop));
    report("AdamW update", "135M", ms);
    Ok(())
}
