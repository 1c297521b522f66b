//! Vector loops of the decode step (norms, attention scores and sums, SwiGLU), written once and
//! compiled for each instruction set: the `#[inline(always)]` bodies are vectorised inside the
//! `target_feature` wrapper [`Isa::best`] selects.

use super::isa::Isa;

/// Independent partial sums, so the loop vectorises without reassociating floats.
const LANES: usize = 16;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

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

multiversion!(
    /// sum_i a_i b_i
    dot, dot_body, (a: &[f32], b: &[f32]) -> f32
);
multiversion!(
    /// y += a x
    axpy, axpy_body, (y: &mut [f32], a: f32, x: &[f32])
);
multiversion!(
    /// y *= a
    scale, scale_body, (y: &mut [f32], a: f32)
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

/// SwiGLU: out_i = silu(gate_i) up_i.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

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
