//! Activations quantised to 8 bits once per matrix input, in blocks of [`BLOCK`] values with one
//! f32 scale each (round to nearest, |q| <= 127), plus each block's sum of q: the integer
//! kernels use it for Q4_1's offset and for the +128 bias of unsigned weight bytes.

/// Values per quantisation block, the GGUF block size of Q4_0/Q4_1/Q8_0.
pub const BLOCK: usize = 32;

/// `rows` activation rows of `cols` values each, quantised.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    pub rows: usize,
    pub cols: usize,
    /// rows x cols
    pub values: Vec<i8>,
    /// rows x cols/BLOCK
    pub scales: Vec<f32>,
    /// rows x cols/BLOCK: the sum of each block's values.
    pub sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantises `x` (rows x cols, cols a multiple of BLOCK) into `self`, reusing its buffers.
    pub fn quantize_from(&mut self, x: &[f32], cols: usize) {
        assert!(
            cols.is_multiple_of(BLOCK),
            "{cols} columns is not a multiple of {BLOCK}"
        );
        let rows = x.len() / cols;
        let blocks = cols / BLOCK;
        self.rows = rows;
        self.cols = cols;
        self.values.resize(rows * cols, 0);
        self.scales.resize(rows * blocks, 0.0);
        self.sums.resize(rows * blocks, 0);
        for (i, block) in x.chunks_exact(BLOCK).enumerate() {
            let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in self.values[i * BLOCK..(i + 1) * BLOCK]
                .iter_mut()
                .zip(block)
            {
                *q = (v * inverse).round() as i8;
                sum += *q as i32;
            }
            self.scales[i] = scale;
            self.sums[i] = sum;
        }
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The bytes of row `r`'s block `b`.
    #[inline(always)]
    pub fn block(&self, r: usize, b: usize) -> &[i8] {
        let start = r * self.cols + b * BLOCK;
        &self.values[start..start + BLOCK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q = QuantizedRows::default();
        q.quantize_from(&x, 64);
        assert_eq!((q.rows, q.blocks_per_row()), (3, 2));
        for (i, block) in x.chunks_exact(BLOCK).enumerate() {
            let scale = q.scales[i];
            let values = &q.values[i * BLOCK..(i + 1) * BLOCK];
            assert_eq!(q.sums[i], values.iter().map(|&v| v as i32).sum::<i32>());
            assert!(values.iter().all(|v| v.unsigned_abs() <= 127));
            for (v, &q) in block.iter().zip(values) {
                assert!((v - q as f32 * scale).abs() <= scale * 0.5 + 1e-6);
            }
        }
        q.quantize_from(&[0.0; 32], 32);
        assert_eq!((q.scales[0], q.sums[0]), (0.0, 0));
    }
}
