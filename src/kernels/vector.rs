//! Vector loops of the decode step (norms, attention scores and sums, SwiGLU), written once and
//! compiled for each instruction set: the `#[inline(always)]` bodies are vectorised inside the
//! `target_feature` wrapper [`Isa::best`] selects.

use super::isa::Isa;
use super::vector_math::{exp, max_of};

/// Independent partial sums, so the loop vectorises without reassociating floats.
const LANES: usize = 16;

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn scale_body(y: &mut [f32], a: f32) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

macro_rules! multiversion {
    ($(#[$doc:meta])* $name:ident, $body:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        pub fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                match isa {
                    // SAFETY: `isa` names a family the CPU was probed to run.
                    Isa::Avx512Vnni => return unsafe { avx512($($arg),*) },
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Portable => {}
                }
            }
            let _ = isa;
            $body($($arg),*)
        }
    };
}

/// One query's causal attention over the first `rows` cached positions: out = the
/// softmax(scale q . k_j) weighted sum of the v_j. `keys` holds the head's keys transposed, q.len() rows of
/// `capacity` positions; position j's value is `values[j * stride + offset..][..q.len()]`.
/// `scores` is scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    q: &[f32],
    keys: &[f32],
    capacity: usize,
    values: &[f32],
    rows: usize,
    stride: usize,
    offset: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dim = q.len();
    scores.clear();
    scores.resize(rows, 0.0);
    for (d, &qd) in q.iter().enumerate() {
        axpy_body(scores, qd * scale, &keys[d * capacity..][..rows]);
    }
    let max = max_of(scores);
    let mut lanes = [0.0f32; LANES];
    for chunk in scores.chunks_mut(LANES) {
        for (lane, s) in lanes.iter_mut().zip(chunk) {
            *s = exp(*s - max);
            *lane += *s;
        }
    }
    let total: f32 = lanes.iter().sum();
    out.fill(0.0);
    for (j, &w) in scores.iter().enumerate() {
        axpy_body(out, w, &values[j * stride + offset..][..dim]);
    }
    scale_body(out, 1.0 / total);
}

multiversion!(
    /// See `attend_body`.
    attend, attend_body, (
        q: &[f32], keys: &[f32], capacity: usize, values: &[f32], rows: usize, stride: usize,
        offset: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]
    )
);
multiversion!(
    /// y += a x
    axpy, axpy_body, (y: &mut [f32], a: f32, x: &[f32])
);

/// RMSNorm of one row: out = x / sqrt(mean(x^2) + eps) * weight, the mean taken in f64 as
/// the tensor path's reduction is.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let mean = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let inverse = (1.0 / (mean + eps).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inverse * w;
    }
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

multiversion!(
    /// SwiGLU: out_i = silu(gate_i) up_i.
    swiglu, swiglu_body, (gate: &[f32], up: &[f32], out: &mut [f32])
);

/// Rotates one head in place by the rotate-half RoPE convention.
pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x, y) = (a[i], b[i]);
        a[i] = x * cos[i] - y * sin[i];
        b[i] = y * cos[i] + x * sin[i];
    }
}
