//! Products over packed weights: a matrix's row groups split over the team's threads, each
//! group's column tiles run by the kernel family the probe chose.

use super::isa::Isa;
use super::packed_matrix::COLUMN_TILE;
use super::packed_matrix::{q4_1_blocks, Format, Input, PackedMatrix, Tile, TileKernels};
use super::quantize::QuantizedRows;
use super::team::Team;
use crate::model::parallel::SharedMut;

impl PackedMatrix {
    /// out[c * ld + r] = sum_k W[r, k] x[c, k] for every column c of `x`, the rows split over
    /// the team's threads.
    pub fn product(&self, team: &Team, isa: Isa, x: Input<'_>, out: &mut [f32], ld: usize) {
        let columns = x.columns();
        assert!(ld >= self.rows && out.len() >= columns.saturating_sub(1) * ld + self.rows);
        let out = SharedMut(out.as_mut_ptr());
        let groups = self.groups();
        team.run(&|thread, threads| {
            let range = groups * thread / threads..groups * (thread + 1) / threads;
            // SAFETY: each thread writes the rows of its own groups only.
            unsafe { self.product_groups(isa, x, range, out, ld) };
        });
    }

    /// The product for the rows of `groups`.
    ///
    /// # Safety
    /// `out` must hold columns x ld values, and no other thread may write these rows.
    pub unsafe fn product_groups(
        &self,
        isa: Isa,
        x: Input<'_>,
        groups: std::ops::Range<usize>,
        out: SharedMut<f32>,
        ld: usize,
    ) {
        match (self.format, x) {
            (Format::F32, Input::F32 { cols, .. }) => assert_eq!(cols, self.cols),
            (Format::Q8 | Format::Q4, Input::Int8(q)) => assert_eq!(q.cols, self.cols),
            _ => panic!("a {:?} matrix cannot read this input", self.format),
        }
        let columns = x.columns();
        for g in groups {
            let mut c = 0;
            while c < columns {
                let tile = (columns - c).min(COLUMN_TILE);
                let tile_out = Tile {
                    out,
                    ld,
                    group: g,
                    column: c,
                    rows: self.rows,
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => dispatch::<super::avx512::Avx512>(self, x, tile_out, tile),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => dispatch::<super::avx2::Avx2>(self, x, tile_out, tile),
                    _ => super::portable::product_tile(self, x, tile_out, tile),
                }
                c += tile;
            }
        }
    }
}

/// Runs `K`'s kernel for the matrix's format with the tile width `columns` (1..=COLUMN_TILE)
/// fixed at compile time.
///
/// # Safety
/// As [`TileKernels`].
pub(super) unsafe fn dispatch<K: TileKernels>(
    m: &PackedMatrix,
    x: Input<'_>,
    tile: Tile,
    columns: usize,
) {
    debug_assert!((1..=COLUMN_TILE).contains(&columns));
    match (m.format, x, columns) {
        (Format::F32, Input::F32 { values, .. }, 1) => K::f32::<1>(m, values, tile),
        (Format::F32, Input::F32 { values, .. }, 2) => K::f32::<2>(m, values, tile),
        (Format::F32, Input::F32 { values, .. }, 3) => K::f32::<3>(m, values, tile),
        (Format::F32, Input::F32 { values, .. }, _) => K::f32::<4>(m, values, tile),
        (Format::Q8, Input::Int8(q), 1) => K::q8::<1>(m, q, tile),
        (Format::Q8, Input::Int8(q), 2) => K::q8::<2>(m, q, tile),
        (Format::Q8, Input::Int8(q), 3) => K::q8::<3>(m, q, tile),
        (Format::Q8, Input::Int8(q), _) => K::q8::<4>(m, q, tile),
        (Format::Q4, Input::Int8(q), 1) => K::q4::<1>(m, q, tile),
        (Format::Q4, Input::Int8(q), 2) => K::q4::<2>(m, q, tile),
        (Format::Q4, Input::Int8(q), 3) => K::q4::<3>(m, q, tile),
        (Format::Q4, Input::Int8(q), _) => K::q4::<4>(m, q, tile),
        _ => unreachable!("checked by product_groups"),
    }
}

/// A fixed product of every format, for the start-up probe of each instruction set.
pub fn self_test(isa: Isa) -> Vec<f32> {
    let (rows, cols, columns) = (20, 64, 3);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 255) as f32 - 127.0) / 64.0)
        .collect();
    let x: Vec<f32> = (0..columns * cols)
        .map(|i| ((i * 104_729 % 201) as f32 - 100.0) / 50.0)
        .collect();
    let mut q = QuantizedRows::default();
    q.quantize_from(&x, cols);
    let q4 = q4_1_blocks(&w, cols);
    let team = Team::single();
    let mut all = Vec::new();
    for (m, input) in [
        (
            PackedMatrix::from_f32(&w, rows, cols),
            Input::F32 { values: &x, cols },
        ),
        (PackedMatrix::quantize_f32(&w, rows, cols), Input::Int8(&q)),
        (PackedMatrix::from_q4_1(&q4, rows, cols), Input::Int8(&q)),
    ] {
        let mut out = vec![0.0; columns * rows];
        m.product(&team, isa, input, &mut out, rows);
        all.extend(out);
    }
    all
}
