//! AVX2 kernels for CPUs without AVX-512: each 16-row group as two 8-row halves. Without VNNI,
//! 8-bit products go through `vpmaddubsw` (u8 x s8 pairs to i16) and `vpmaddwd`; Q8 weights
//! are multiplied as |w| times x with w's sign, so no i16 pair sum can saturate.

use super::packed_matrix::{PackedMatrix, Tile, TileKernels, GROUP};
use super::quantize::{QuantizedRows, BLOCK};
use std::arch::x86_64::*;

/// The AVX2 kernel family.
pub struct Avx2;

impl TileKernels for Avx2 {
    unsafe fn f32<const T: usize>(m: &PackedMatrix, x: &[f32], tile: Tile) {
        f32_tile::<T>(m, x, tile)
    }
    unsafe fn q8<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
        int8_tile::<T, false>(m, q, tile)
    }
    unsafe fn q4<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
        int8_tile::<T, true>(m, q, tile)
    }
}

#[inline(always)]
unsafe fn store<const T: usize>(tile: Tile, sums: [[__m256; 2]; T]) {
    for (c, [a, b]) in sums.into_iter().enumerate() {
        let mut lanes = [0.0f32; GROUP];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), b);
        tile.store(c, &lanes);
    }
}

#[inline(always)]
unsafe fn halves_f16(p: *const u16) -> [__m256; 2] {
    [
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i)),
    ]
}

/// u8 x s8 products of 4-byte groups summed to i32 lanes.
#[inline(always)]
unsafe fn dot4(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int8_tile<const T: usize, const Q4: bool>(
    m: &PackedMatrix,
    q: &QuantizedRows,
    tile: Tile,
) {
    let (g, blocks) = (tile.group, m.blocks());
    let chunk_bytes = if Q4 { GROUP * BLOCK / 2 } else { GROUP * BLOCK };
    let mut sums = [[_mm256_setzero_ps(); 2]; T];
    for b in 0..blocks {
        let gb = g * blocks + b;
        let w = m.bytes.as_ptr().add(gb * chunk_bytes);
        let scale = halves_f16(m.scales.as_ptr().add(gb * GROUP));
        for half in 0..2 {
            let mut dots = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                let (weights, x_sign) = if Q4 {
                    let packed =
                        _mm256_loadu_si256(w.add(64 * (k % 4) + 32 * half) as *const __m256i);
                    let nibbles = if k < 4 {
                        packed
                    } else {
                        _mm256_srli_epi16(packed, 4)
                    };
                    (_mm256_and_si256(nibbles, _mm256_set1_epi8(0x0f)), None)
                } else {
                    let biased = _mm256_loadu_si256(w.add(64 * k + 32 * half) as *const __m256i);
                    let signed = _mm256_xor_si256(biased, _mm256_set1_epi8(-128));
                    (_mm256_sign_epi8(signed, signed), Some(signed))
                };
                for (c, dot) in dots.iter_mut().enumerate() {
                    let p = q
                        .values
                        .as_ptr()
                        .add((tile.column + c) * q.cols + b * BLOCK + 4 * k);
                    let mut xv = _mm256_set1_epi32((p as *const i32).read_unaligned());
                    if let Some(sign) = x_sign {
                        xv = _mm256_sign_epi8(xv, sign);
                    }
                    *dot = _mm256_add_epi32(*dot, dot4(weights, xv));
                }
            }
            for (c, dot) in dots.into_iter().enumerate() {
                let at = (tile.column + c) * blocks + b;
                let sx = q.scales[at];
                let sum = &mut sums[c][half];
                *sum = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dot),
                    _mm256_mul_ps(scale[half], _mm256_set1_ps(sx)),
                    *sum,
                );
                if Q4 {
                    let min = halves_f16(m.minima.as_ptr().add(gb * GROUP))[half];
                    *sum = _mm256_fmadd_ps(min, _mm256_set1_ps(sx * q.sums[at] as f32), *sum);
                }
            }
        }
    }
    store(tile, sums);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn f32_tile<const T: usize>(m: &PackedMatrix, x: &[f32], tile: Tile) {
    let (g, cols) = (tile.group, m.cols);
    let w = m.floats.as_ptr().add(g * cols * GROUP);
    let mut sums = [[_mm256_setzero_ps(); 2]; T];
    for k in 0..cols {
        let wv = [
            _mm256_loadu_ps(w.add(k * GROUP)),
            _mm256_loadu_ps(w.add(k * GROUP + 8)),
        ];
        for (c, sum) in sums.iter_mut().enumerate() {
            let xv = _mm256_set1_ps(*x.get_unchecked((tile.column + c) * cols + k));
            sum[0] = _mm256_fmadd_ps(wv[0], xv, sum[0]);
            sum[1] = _mm256_fmadd_ps(wv[1], xv, sum[1]);
        }
    }
    store(tile, sums);
}
