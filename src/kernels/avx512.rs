//! AVX-512 kernels: 16 rows per zmm register, VNNI `vpdpbusd` for the 8-bit products (unsigned
//! weight bytes times signed activation bytes, four per lane), f16 scales widened in-register.
//! Up to [`super::packed_matrix::COLUMN_TILE`] activation columns share each weight load.

use super::packed_matrix::{PackedMatrix, Tile, TileKernels, GROUP};
use super::quantize::{QuantizedRows, BLOCK};
use std::arch::x86_64::*;

/// The AVX-512 VNNI kernel family.
pub struct Avx512;

impl TileKernels for Avx512 {
    unsafe fn f32<const T: usize>(m: &PackedMatrix, x: &[f32], tile: Tile) {
        f32_tile::<T>(m, x, tile)
    }
    unsafe fn q8<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
        q8_tile::<T>(m, q, tile)
    }
    unsafe fn q4<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
        q4_tile::<T>(m, q, tile)
    }
}

#[inline(always)]
unsafe fn store<const T: usize>(tile: Tile, sums: [__m512; T]) {
    for (c, s) in sums.into_iter().enumerate() {
        let mut lanes = [0.0f32; GROUP];
        _mm512_storeu_ps(lanes.as_mut_ptr(), s);
        tile.store(c, &lanes);
    }
}

/// Four activation bytes of column `col`, block `b`, chunk `k`, in every lane.
#[inline(always)]
unsafe fn broadcast4(q: &QuantizedRows, col: usize, b: usize, k: usize) -> __m512i {
    let p = q.values.as_ptr().add(col * q.cols + b * BLOCK + 4 * k) as *const i32;
    _mm512_set1_epi32(p.read_unaligned())
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
unsafe fn q8_tile<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
    let (g, blocks) = (tile.group, m.blocks());
    let mut sums = [_mm512_setzero_ps(); T];
    for b in 0..blocks {
        let gb = g * blocks + b;
        let w = m.bytes.as_ptr().add(gb * GROUP * BLOCK);
        let scale = _mm512_cvtph_ps(_mm256_loadu_si256(
            m.scales.as_ptr().add(gb * GROUP) as *const __m256i
        ));
        // The weight bytes are w + 128: start each dot at -128 * sum(x) to cancel the bias.
        let mut dots: [__m512i; T] = std::array::from_fn(|c| {
            _mm512_set1_epi32(-128 * q.sums[(tile.column + c) * blocks + b])
        });
        for k in 0..8 {
            let wv = _mm512_loadu_si512(w.add(64 * k) as *const _);
            for (c, dot) in dots.iter_mut().enumerate() {
                *dot = _mm512_dpbusd_epi32(*dot, wv, broadcast4(q, tile.column + c, b, k));
            }
        }
        for (c, (sum, dot)) in sums.iter_mut().zip(dots).enumerate() {
            let s = _mm512_mul_ps(
                scale,
                _mm512_set1_ps(q.scales[(tile.column + c) * blocks + b]),
            );
            *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, *sum);
        }
    }
    store(tile, sums);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
unsafe fn q4_tile<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile) {
    let (g, blocks) = (tile.group, m.blocks());
    let low = _mm512_set1_epi8(0x0f);
    let mut sums = [_mm512_setzero_ps(); T];
    for b in 0..blocks {
        let gb = g * blocks + b;
        let w = m.bytes.as_ptr().add(gb * GROUP * BLOCK / 2);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(
            m.scales.as_ptr().add(gb * GROUP) as *const __m256i
        ));
        let min = _mm512_cvtph_ps(_mm256_loadu_si256(
            m.minima.as_ptr().add(gb * GROUP) as *const __m256i
        ));
        let mut dots = [_mm512_setzero_si512(); T];
        for j in 0..4 {
            let packed = _mm512_loadu_si512(w.add(64 * j) as *const _);
            let lo = _mm512_and_si512(packed, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            for (c, dot) in dots.iter_mut().enumerate() {
                *dot = _mm512_dpbusd_epi32(*dot, lo, broadcast4(q, tile.column + c, b, j));
                *dot = _mm512_dpbusd_epi32(*dot, hi, broadcast4(q, tile.column + c, b, j + 4));
            }
        }
        for (c, (sum, dot)) in sums.iter_mut().zip(dots).enumerate() {
            let at = (tile.column + c) * blocks + b;
            let sx = q.scales[at];
            *sum = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(dot),
                _mm512_mul_ps(d, _mm512_set1_ps(sx)),
                *sum,
            );
            *sum = _mm512_fmadd_ps(min, _mm512_set1_ps(sx * q.sums[at] as f32), *sum);
        }
    }
    store(tile, sums);
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn f32_tile<const T: usize>(m: &PackedMatrix, x: &[f32], tile: Tile) {
    let (g, cols) = (tile.group, m.cols);
    let w = m.floats.as_ptr().add(g * cols * GROUP);
    let mut sums = [_mm512_setzero_ps(); T];
    for k in 0..cols {
        let wv = _mm512_loadu_ps(w.add(k * GROUP));
        for (c, sum) in sums.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.get_unchecked((tile.column + c) * cols + k));
            *sum = _mm512_fmadd_ps(wv, xv, *sum);
        }
    }
    store(tile, sums);
}
