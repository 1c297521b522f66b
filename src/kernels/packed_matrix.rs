//! Weight matrices repacked at load into the layout the CPU kernels stream.
//!
//! Rows are taken [`GROUP`] at a time and interleaved, so one vector load holds the same four
//! consecutive inputs of 16 rows: a kernel broadcasts four activation bytes (or one f32) and
//! updates 16 rows' sums with a single instruction, and a group's outputs come out as one
//! vector with no horizontal sums. Per group and 32-value block:
//!
//! - `Q8` (from Q8_0, or any other weight requantised): 8 chunks of 64 bytes, chunk k holding
//!   values 4k..4k+3 of each row as `w + 128` (unsigned, the operand VNNI multiplies as u8), and
//!   16 f16 scales.
//! - `Q4` (from Q4_1, kept at 4 bits): 4 chunks of 64 bytes, chunk j's low nibbles holding
//!   values 4j..4j+3 and its high nibbles values 4j+16..4j+19, 16 f16 scales and 16 f16 minima
//!   (w = d q + m).
//! - `F32`: per input k, the 16 rows' values.
//!
//! Rows past the matrix's end are zero. Each output is summed by one thread in one order
//! whatever the thread count or the number of columns, so served tokens do not depend on them.

use super::quantize::{QuantizedRows, BLOCK};
use crate::model::parallel::SharedMut;
use half::f16;

/// Rows interleaved per group.
pub const GROUP: usize = 16;
/// Activation columns a kernel call updates per pass over a group's weights.
pub const COLUMN_TILE: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    Q8,
    Q4,
}

/// A (rows x cols) matrix W in the packed layout; products compute x W^T.
pub struct PackedMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub(super) bytes: Vec<u8>,
    pub(super) floats: Vec<f32>,
    /// f16 bits, GROUP per (group, block).
    pub(super) scales: Vec<u16>,
    pub(super) minima: Vec<u16>,
}

/// The activation columns of a product, in the form the matrix's format reads.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32 { values: &'a [f32], cols: usize },
    Int8(&'a QuantizedRows),
}

impl Input<'_> {
    pub(super) fn columns(&self) -> usize {
        match self {
            Input::F32 { values, cols } => values.len() / cols,
            Input::Int8(q) => q.rows,
        }
    }
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({:?}, {}x{})",
            self.format, self.rows, self.cols
        )
    }
}

impl PackedMatrix {
    fn empty(format: Format, rows: usize, cols: usize) -> Self {
        let groups = rows.div_ceil(GROUP);
        let blocks = cols / BLOCK;
        let (bytes, floats, scales, minima) = match format {
            Format::F32 => (0, groups * cols * GROUP, 0, 0),
            Format::Q8 => (
                groups * blocks * GROUP * BLOCK,
                0,
                groups * blocks * GROUP,
                0,
            ),
            Format::Q4 => {
                let n = groups * blocks * GROUP;
                (n * BLOCK / 2, 0, n, n)
            }
        };
        Self {
            format,
            rows,
            cols,
            bytes: vec![if format == Format::Q8 { 128 } else { 0 }; bytes],
            floats: vec![0.0; floats],
            scales: vec![0; scales],
            minima: vec![0; minima],
        }
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    pub fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Whether products read 8-bit activations.
    pub fn reads_int8(&self) -> bool {
        self.format != Format::F32
    }

    /// Keeps f32 rows as they are.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        let mut m = Self::empty(Format::F32, rows, cols);
        for (r, row) in w.chunks_exact(cols).enumerate() {
            let (g, lane) = (r / GROUP, r % GROUP);
            for (k, &v) in row.iter().enumerate() {
                m.floats[(g * cols + k) * GROUP + lane] = v;
            }
        }
        m
    }

    /// Quantises f32 rows to 8 bits per value, one scale per block of 32 (as Q8_0 does).
    pub fn quantize_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        check_blocks(cols);
        let mut m = Self::empty(Format::Q8, rows, cols);
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = f16::from_f32(max / 127.0);
                let inverse = if scale.to_f32() > 0.0 {
                    1.0 / scale.to_f32()
                } else {
                    0.0
                };
                let mut q = [0i8; BLOCK];
                for (q, v) in q.iter_mut().zip(block) {
                    *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                }
                m.set_q8_block(r, b, scale.to_bits(), &q);
            }
        }
        m
    }

    /// Repacks GGUF Q8_0 blocks (f16 scale, 32 i8), rows of cols/32 blocks.
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> Self {
        const SIZE: usize = 2 + BLOCK;
        check_blocks(cols);
        assert_eq!(raw.len(), rows * cols / BLOCK * SIZE);
        let mut m = Self::empty(Format::Q8, rows, cols);
        for (i, block) in raw.chunks_exact(SIZE).enumerate() {
            let (r, b) = (i / m.blocks(), i % m.blocks());
            let q: [i8; BLOCK] = std::array::from_fn(|e| block[2 + e] as i8);
            m.set_q8_block(r, b, u16::from_le_bytes([block[0], block[1]]), &q);
        }
        m
    }

    /// Repacks GGUF Q4_1 blocks, keeping them at 4 bits.
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> Self {
        let m = Self::from_four_bit(&[FourBit::Q4_1(raw)], cols);
        assert_eq!(m.rows, rows);
        m
    }

    /// Stacks the rows of 4-bit GGUF matrices of `cols` inputs, each block as a 4-bit block
    /// with an f16 scale and minimum (w = d q + m).
    pub fn from_four_bit(parts: &[FourBit<'_>], cols: usize) -> Self {
        let rows = parts.iter().map(|p| p.rows(cols)).sum();
        let mut m = Self::empty(Format::Q4, rows, cols);
        let mut first = 0;
        for part in parts {
            let (size, values) = part.block_shape();
            assert!(
                cols.is_multiple_of(values),
                "{cols} inputs is not a multiple of {values}"
            );
            let raw = part.bytes();
            let per_row = cols / values;
            let mut unpacked = vec![(f16::ZERO, f16::ZERO, [0u8; BLOCK]); values / BLOCK];
            for (i, block) in raw.chunks_exact(size).enumerate() {
                let (r, b) = (first + i / per_row, (i % per_row) * values / BLOCK);
                part.unpack(block, &mut unpacked);
                for (j, (d, min, q)) in unpacked.iter().enumerate() {
                    m.set_q4_block(r, b + j, *d, *min, q);
                }
            }
            first += part.rows(cols);
        }
        m
    }

    fn set_q4_block(&mut self, r: usize, b: usize, d: f16, min: f16, q: &[u8; BLOCK]) {
        let blocks = self.blocks();
        let (g, lane) = (r / GROUP, r % GROUP);
        let at = (g * blocks + b) * GROUP + lane;
        self.scales[at] = d.to_bits();
        self.minima[at] = min.to_bits();
        let base = (g * blocks + b) * GROUP * BLOCK / 2;
        for j in 0..4 {
            for v in 0..4 {
                self.bytes[base + j * 64 + lane * 4 + v] = q[4 * j + v] | (q[4 * j + 16 + v] << 4);
            }
        }
    }

    fn set_q8_block(&mut self, r: usize, b: usize, scale_bits: u16, q: &[i8; BLOCK]) {
        let blocks = self.blocks();
        let (g, lane) = (r / GROUP, r % GROUP);
        self.scales[(g * blocks + b) * GROUP + lane] = scale_bits;
        let base = (g * blocks + b) * GROUP * BLOCK;
        for (e, &v) in q.iter().enumerate() {
            self.bytes[base + (e / 4) * 64 + lane * 4 + e % 4] = (v as i32 + 128) as u8;
        }
    }

    /// Value (r, k) as the kernels see it (tests and references).
    pub fn get(&self, r: usize, k: usize) -> f32 {
        let (g, lane, blocks) = (r / GROUP, r % GROUP, self.blocks());
        let (b, e) = (k / BLOCK, k % BLOCK);
        let at = (g * blocks + b) * GROUP + lane;
        match self.format {
            Format::F32 => self.floats[(g * self.cols + k) * GROUP + lane],
            Format::Q8 => {
                let byte =
                    self.bytes[(g * blocks + b) * GROUP * BLOCK + (e / 4) * 64 + lane * 4 + e % 4];
                (byte as i32 - 128) as f32 * f16::from_bits(self.scales[at]).to_f32()
            }
            Format::Q4 => {
                let (j, high) = ((e % 16) / 4, e >= 16);
                let byte =
                    self.bytes[(g * blocks + b) * GROUP * BLOCK / 2 + j * 64 + lane * 4 + e % 4];
                let q = if high { byte >> 4 } else { byte & 0x0f };
                q as f32 * f16::from_bits(self.scales[at]).to_f32()
                    + f16::from_bits(self.minima[at]).to_f32()
            }
        }
    }
}

fn check_blocks(cols: usize) {
    assert!(
        cols.is_multiple_of(BLOCK),
        "{cols} inputs is not a multiple of {BLOCK}"
    );
}

/// One instruction set's kernels for a tile of `T` activation columns.
pub(super) trait TileKernels {
    /// # Safety
    /// The CPU runs the kernels' instruction set; stores as [`Tile::store`].
    unsafe fn f32<const T: usize>(m: &PackedMatrix, x: &[f32], tile: Tile);
    /// # Safety
    /// As `f32`.
    unsafe fn q8<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile);
    /// # Safety
    /// As `f32`.
    unsafe fn q4<const T: usize>(m: &PackedMatrix, q: &QuantizedRows, tile: Tile);
}

/// Where a kernel writes one group's rows for a run of columns.
#[derive(Clone, Copy)]
pub struct Tile {
    pub out: SharedMut<f32>,
    pub ld: usize,
    pub group: usize,
    pub column: usize,
    pub rows: usize,
}

impl Tile {
    /// Writes column `c` (relative to the tile) of the group's sums, dropping padding rows.
    ///
    /// # Safety
    /// The tile's rows of that column must be this thread's to write.
    #[inline(always)]
    pub unsafe fn store(&self, c: usize, sums: &[f32; GROUP]) {
        let first = self.group * GROUP;
        let n = (self.rows - first).min(GROUP);
        let at = (self.column + c) * self.ld + first;
        std::ptr::copy_nonoverlapping(sums.as_ptr(), self.out.ptr().add(at), n);
    }
}

/// A 4-bit GGUF matrix's raw blocks.
#[derive(Clone, Copy)]
pub enum FourBit<'a> {
    /// f16 d, 16 nibble bytes; w = d (q - 8).
    Q4_0(&'a [u8]),
    /// f16 d, f16 m, 16 nibble bytes; w = d q + m.
    Q4_1(&'a [u8]),
    /// 256-value super-blocks: f16 d and dmin, twelve bytes of 6-bit sub-block scales and
    /// minima, 128 bytes of nibbles in 64-value chunks (low nibbles first); w = d sc q - dmin m.
    Q4K(&'a [u8]),
}

impl FourBit<'_> {
    /// (bytes, values) of one block.
    fn block_shape(&self) -> (usize, usize) {
        match self {
            FourBit::Q4_0(_) => (2 + BLOCK / 2, BLOCK),
            FourBit::Q4_1(_) => (4 + BLOCK / 2, BLOCK),
            FourBit::Q4K(_) => (4 + 12 + 128, 256),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            FourBit::Q4_0(b) | FourBit::Q4_1(b) | FourBit::Q4K(b) => b,
        }
    }

    fn rows(&self, cols: usize) -> usize {
        let (size, values) = self.block_shape();
        self.bytes().len() / size * values / cols
    }

    /// One block as (scale, minimum, nibbles) per 32 values.
    fn unpack(&self, block: &[u8], out: &mut [(f16, f16, [u8; BLOCK])]) {
        let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]);
        match self {
            FourBit::Q4_0(_) => {
                let d = half(0);
                out[0] = (
                    d,
                    f16::from_f32(-8.0 * d.to_f32()),
                    split_nibbles(&block[2..]),
                );
            }
            FourBit::Q4_1(_) => out[0] = (half(0), half(2), split_nibbles(&block[4..])),
            FourBit::Q4K(_) => {
                let (d, dmin) = (half(0).to_f32(), half(2).to_f32());
                let (scales, nibbles) = (&block[4..16], &block[16..]);
                for (sub, out) in out.iter_mut().enumerate() {
                    let (sc, m) = if sub < 4 {
                        (scales[sub] & 63, scales[sub + 4] & 63)
                    } else {
                        (
                            (scales[sub + 4] & 0x0f) | ((scales[sub - 4] >> 6) << 4),
                            (scales[sub + 4] >> 4) | ((scales[sub] >> 6) << 4),
                        )
                    };
                    let chunk = &nibbles[32 * (sub / 2)..][..32];
                    let shift = 4 * (sub % 2);
                    let q = std::array::from_fn(|e| (chunk[e] >> shift) & 0x0f);
                    *out = (
                        f16::from_f32(d * sc as f32),
                        f16::from_f32(-dmin * m as f32),
                        q,
                    );
                }
            }
        }
    }
}

/// The 32 values of a Q4_0/Q4_1 block's 16 nibble bytes: value e in byte e's low nibble,
/// value e + 16 in its high nibble.
fn split_nibbles(bytes: &[u8]) -> [u8; BLOCK] {
    std::array::from_fn(|e| {
        if e < 16 {
            bytes[e] & 0x0f
        } else {
            bytes[e - 16] >> 4
        }
    })
}

/// Rows quantised to GGUF Q4_1 blocks (the layout llama.cpp writes), for tests and probes.
pub fn q4_1_blocks(w: &[f32], cols: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(w.len() / BLOCK * 20);
    for block in w.chunks_exact(BLOCK) {
        debug_assert!(cols.is_multiple_of(BLOCK));
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = f16::from_f32((max - min) / 15.0);
        let m = f16::from_f32(min);
        let inverse = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let q: Vec<u8> = block
            .iter()
            .map(|v| ((v - m.to_f32()) * inverse).round().clamp(0.0, 15.0) as u8)
            .collect();
        raw.extend(d.to_le_bytes());
        raw.extend(m.to_le_bytes());
        raw.extend((0..16).map(|e| q[e] | (q[e + 16] << 4)));
    }
    raw
}
