//! Scalar pieces of the CPU row kernels (softmaxes, SwiGLU, the loss, sampling), written so
//! that loops over slices vectorise.
//!
//! libm's `expf` is a scalar call: a CPU training step calls it millions of times (attention
//! softmaxes, SwiGLU and its backward, the LM head's loss), and it was the largest cost after
//! the matrix products. This `exp` is branch-free (range reduction by ln 2, a degree-7 Taylor
//! polynomial on |r| <= ln2/2, the power of two built from integer bits), so LLVM turns a loop
//! over it into SIMD code. Error: a few units in the last place (tested against f64). Results
//! below e^-86.5 (near the subnormal range) are exactly 0, so masked (-inf) entries get no weight.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: the high part has few significant bits, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// Below this, e^x is flushed to 0 (keeps the exponent field of 2^(n-1) at least 1).
const LOWEST: f32 = -86.5;
/// Above this (ln of f32::MAX, rounded up), e^x overflows f32.
const HIGHEST: f32 = 88.722_84;

/// e^x in f32.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r by Horner; the Taylor remainder r^8/8! is below 5e-9 on |r| <= ln2/2.
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^(n-1) from the integer n in `shifted`'s low bits, times 2 (n may be 128).
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let half_scale = f32::from_bits(n_bits.wrapping_add(126) << 23);
    let y = p * half_scale * 2.0;
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        y
    }
}

/// Runs `kernel` compiled for AVX2 where the CPU has it (the baseline x86-64 target has only
/// SSE2, half the vector width). Results are the same either way: the kernels are elementwise
/// or reduce in a fixed lane order, their operations are exactly rounded, and Rust never fuses a
/// multiply and an add on its own.
#[inline(always)]
pub fn wide<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { avx2(kernel) };
    }
    kernel()
}

/// Maximum of `values` (-inf for an empty or all -inf slice; NaN is ignored). Eight independent
/// lanes so the compiler can use SIMD max.
pub fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sum in f64 (a softmax's normaliser over ~1e5 terms keeps its precision).
pub fn sum_f64(values: &[f32]) -> f64 {
    lane_sum(values, f64::from)
}

/// Sum of squares in f64 (a gradient's norm).
pub fn sum_squares_f64(values: &[f32]) -> f64 {
    lane_sum(values, |v| f64::from(v) * f64::from(v))
}

/// Sum of `term(v)` over eight lanes, so the additions pipeline instead of forming one
/// dependency chain; a fixed order, whatever the CPU.
#[inline(always)]
fn lane_sum(values: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += term(v);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| term(v)).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let ulp = f64::from(f32::EPSILON) * want.abs().max(f64::from(f32::MIN_POSITIVE));
        (f64::from(got) - want).abs() / ulp
    }

    /// Against f64 exp over the whole finite range, in steps finer than f32's spacing near 0.
    #[test]
    fn within_a_few_ulps_of_f64_everywhere() {
        let mut worst = (0f64, 0f32);
        let mut x = LOWEST;
        while x <= HIGHEST {
            let e = ulps(exp(x), f64::from(x).exp());
            if e > worst.0 {
                worst = (e, x);
            }
            x += 1.3e-4;
        }
        for x in [
            -1e-30f32, 0.0, 1e-30, 1e-7, -1e-7, 0.5, -0.5, 1.0, 88.7, -86.4,
        ] {
            let e = ulps(exp(x), f64::from(x).exp());
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 4.0, "{} ulps at x = {}", worst.0, worst.1);
    }

    #[test]
    fn edges_saturate_and_nan_propagates() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-87.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(88.72).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_helpers_match_plain_loops() {
        let values: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        assert_eq!(
            max_of(&values),
            values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        let plain: f64 = values.iter().map(|&v| f64::from(v)).sum();
        assert!((sum_f64(&values) - plain).abs() < 1e-9);
    }
}
