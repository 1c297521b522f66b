//! The kernels in plain Rust: every CPU runs them, and they define what the vector kernels
//! compute (the same per-block sums, accumulated in the same order per output).

use super::packed_matrix::{Format, Input, PackedMatrix, Tile, GROUP};
use super::quantize::BLOCK;
use half::f16;

/// One group's rows for `columns` activation columns starting at the tile's column.
///
/// # Safety
/// As [`Tile::store`].
pub unsafe fn product_tile(m: &PackedMatrix, x: Input<'_>, tile: Tile, columns: usize) {
    let (g, blocks) = (tile.group, m.blocks());
    for c in 0..columns {
        let col = tile.column + c;
        let mut sums = [0.0f32; GROUP];
        match (m.format, x) {
            (Format::F32, Input::F32 { values, cols }) => {
                let x = &values[col * cols..(col + 1) * cols];
                for (k, &xv) in x.iter().enumerate() {
                    let w = &m.floats[(g * cols + k) * GROUP..][..GROUP];
                    for (s, &w) in sums.iter_mut().zip(w) {
                        *s += w * xv;
                    }
                }
            }
            (Format::Q8, Input::Int8(q)) => {
                for b in 0..blocks {
                    let xb = q.block(col, b);
                    let w = &m.bytes[(g * blocks + b) * GROUP * BLOCK..][..GROUP * BLOCK];
                    let at = (g * blocks + b) * GROUP;
                    let sx = q.scales[col * blocks + b];
                    for (lane, s) in sums.iter_mut().enumerate() {
                        let mut dot = 0i32;
                        for (e, &xv) in xb.iter().enumerate() {
                            let byte = w[(e / 4) * 64 + lane * 4 + e % 4];
                            dot += (byte as i32 - 128) * xv as i32;
                        }
                        *s += dot as f32 * (f16::from_bits(m.scales[at + lane]).to_f32() * sx);
                    }
                }
            }
            (Format::Q4, Input::Int8(q)) => {
                for b in 0..blocks {
                    let xb = q.block(col, b);
                    let w = &m.bytes[(g * blocks + b) * GROUP * BLOCK / 2..][..GROUP * BLOCK / 2];
                    let at = (g * blocks + b) * GROUP;
                    let (sx, sum) = (q.scales[col * blocks + b], q.sums[col * blocks + b]);
                    for (lane, s) in sums.iter_mut().enumerate() {
                        let mut dot = 0i32;
                        for (e, &xv) in xb.iter().enumerate() {
                            let byte = w[((e % 16) / 4) * 64 + lane * 4 + e % 4];
                            let nibble = if e >= 16 { byte >> 4 } else { byte & 0x0f };
                            dot += nibble as i32 * xv as i32;
                        }
                        let d = f16::from_bits(m.scales[at + lane]).to_f32();
                        let min = f16::from_bits(m.minima[at + lane]).to_f32();
                        *s += dot as f32 * (d * sx);
                        *s += min * (sx * sum as f32);
                    }
                }
            }
            _ => unreachable!("checked by product_groups"),
        }
        tile.store(c, &sums);
    }
}
