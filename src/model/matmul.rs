//! Matrix products. On the CPU, f32 and f64 products run through OpenBLAS (feature `openblas`,
//! on by default, used when build.rs finds the library): its kernels beat candle's built-in GEMM by 15-25% on the shapes of a
//! decoder's step (`docs/benchmarks.md`). OpenBLAS runs single-threaded and the product is
//! split into row or column panels over candle's own CPU thread pool, the one its elementwise
//! ops run on: no second pool's threads wait for work on the cores candle's are using (faster
//! per training step than rayon's pool on two cores, `docs/benchmarks.md`), and each output
//! element's sum runs in the same order whatever the thread count. Other devices and dtypes use
//! candle's own matmul.

use candle_core::{Result, Tensor};

/// `a @ b` over the last two dimensions, with equal leading (batch) dimensions; recorded for
/// autograd like candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(rewind_openblas)]
    if blas::supports(a, b) {
        return a.apply_op2(b, blas::BlasMatmul);
    }
    // candle's GEMM reads a batch of matrices only when one stride steps through it; others
    // (heads split out of a wider row) are copied into rows first.
    match a.matmul(b) {
        Err(_) if !(a.is_contiguous() && b.is_contiguous()) => {
            a.contiguous()?.matmul(&b.contiguous()?)
        }
        result => result,
    }
}

#[cfg(rewind_openblas)]
mod blas {
    use crate::model::parallel::{self, SharedMut};
    use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
    use std::mem::MaybeUninit;
    use std::sync::Once;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;
    /// Smallest panel worth a thread of its own.
    const MIN_PANEL: usize = 32;

    // Linked by build.rs, which sets `rewind_openblas` only when it found the library.
    extern "C" {
        fn openblas_set_num_threads(threads: i32);
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn cblas_dgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f64,
            a: *const f64,
            lda: i32,
            b: *const f64,
            ldb: i32,
            beta: f64,
            c: *mut f64,
            ldc: i32,
        );
    }

    /// An element type with a BLAS GEMM.
    trait Gemm: Copy + Default + Send + Sync {
        /// C (m x n, leading dimension ldc) = op(A) op(B).
        ///
        /// # Safety
        /// The pointers must address matrices of the given shapes and leading dimensions.
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm(
            trans_a: i32,
            trans_b: i32,
            dims: (usize, usize, usize),
            a: *const Self,
            lda: usize,
            b: *const Self,
            ldb: usize,
            c: *mut Self,
            ldc: usize,
        );
    }

    macro_rules! impl_gemm {
        ($t:ty, $f:ident) => {
            impl Gemm for $t {
                unsafe fn gemm(
                    trans_a: i32,
                    trans_b: i32,
                    (m, n, k): (usize, usize, usize),
                    a: *const Self,
                    lda: usize,
                    b: *const Self,
                    ldb: usize,
                    c: *mut Self,
                    ldc: usize,
                ) {
                    $f(
                        ROW_MAJOR, trans_a, trans_b, m as i32, n as i32, k as i32, 1.0, a,
                        lda as i32, b, ldb as i32, 0.0, c, ldc as i32,
                    )
                }
            }
        };
    }
    impl_gemm!(f32, cblas_sgemm);
    impl_gemm!(f64, cblas_dgemm);

    /// How one operand's matrices sit in memory: BLAS reads a matrix either row-major
    /// (`transposed == false`) or as the transpose of a row-major one, each with a leading
    /// dimension; the batch dimensions may have any strides.
    #[derive(Clone, Copy)]
    struct MatrixLayout {
        transposed: bool,
        leading: usize,
    }

    impl MatrixLayout {
        fn of(layout: &Layout) -> Option<Self> {
            let dims = layout.dims();
            let stride = layout.stride();
            let r = dims.len();
            let (rows, cols) = (dims[r - 2], dims[r - 1]);
            let (row_stride, col_stride) = (stride[r - 2], stride[r - 1]);
            // A dimension of size one has a stride that no element depends on.
            if col_stride == 1 || cols == 1 {
                let leading = if rows == 1 { cols } else { row_stride };
                (leading >= cols.max(1)).then_some(Self {
                    transposed: false,
                    leading,
                })
            } else if row_stride == 1 || rows == 1 {
                (col_stride >= rows.max(1)).then_some(Self {
                    transposed: true,
                    leading: col_stride,
                })
            } else {
                None
            }
            .filter(|m| m.leading <= i32::MAX as usize)
        }

        fn flag(self) -> i32 {
            if self.transposed {
                TRANS
            } else {
                NO_TRANS
            }
        }

        /// Offset of row `row` of the (logical) matrix.
        fn row_offset(self, row: usize) -> usize {
            if self.transposed {
                row
            } else {
                row * self.leading
            }
        }

        /// Offset of column `col` of the (logical) matrix.
        fn col_offset(self, col: usize) -> usize {
            if self.transposed {
                col * self.leading
            } else {
                col
            }
        }
    }

    /// Whether `a @ b` can run through BLAS: CPU, both f32 or both f64, equal ranks and batch
    /// dimensions, matching inner dimensions, and matrices BLAS can address without a copy.
    pub fn supports(a: &Tensor, b: &Tensor) -> bool {
        let (da, db) = (a.dims(), b.dims());
        a.device().is_cpu()
            && b.device().is_cpu()
            && a.dtype() == b.dtype()
            && matches!(a.dtype(), DType::F32 | DType::F64)
            && da.len() >= 2
            && da.len() == db.len()
            && da[..da.len() - 2] == db[..db.len() - 2]
            && da[da.len() - 1] == db[db.len() - 2]
            && da.iter().chain(db).all(|&d| d <= i32::MAX as usize)
            && MatrixLayout::of(a.layout()).is_some()
            && MatrixLayout::of(b.layout()).is_some()
    }

    /// Start offset of every batch entry's matrix, in row-major order of the batch index.
    fn batch_offsets(layout: &Layout) -> Vec<usize> {
        let dims = layout.dims();
        let batch = &dims[..dims.len() - 2];
        let stride = &layout.stride()[..dims.len() - 2];
        let mut offsets = vec![layout.start_offset()];
        for (&d, &s) in batch.iter().zip(stride) {
            offsets = offsets
                .iter()
                .flat_map(|&o| (0..d).map(move |i| o + i * s))
                .collect();
        }
        offsets
    }

    fn product<T: Gemm>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Result<(Vec<T>, Shape)> {
        let dims = la.dims();
        let r = dims.len();
        let (m, k, n) = (dims[r - 2], dims[r - 1], lb.dims()[r - 1]);
        let mut out_dims = dims.to_vec();
        out_dims[r - 1] = n;
        let shape = Shape::from(out_dims);
        let len = shape.elem_count();
        if len == 0 || k == 0 {
            return Ok((vec![T::default(); len], shape));
        }
        // Not zeroed first: with beta = 0 BLAS ignores C's contents, and the panels cover every
        // element (a serial memset of the whole output was 2% of a training step).
        let mut out: Vec<MaybeUninit<T>> = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { out.set_len(len) };
        let (ma, mb) = match (MatrixLayout::of(la), MatrixLayout::of(lb)) {
            (Some(ma), Some(mb)) => (ma, mb),
            _ => candle_core::bail!("matmul: operand strides BLAS cannot address"),
        };
        let (offsets_a, offsets_b) = (batch_offsets(la), batch_offsets(lb));
        let Panels {
            split_rows,
            side,
            panel,
            per_matrix: panels_per_matrix,
        } = Panels::plan(m, n, offsets_a.len(), parallel::threads());
        let out_ptr = SharedMut(out.as_mut_ptr().cast::<T>());
        parallel::for_each(offsets_a.len() * panels_per_matrix, |task| {
            let (matrix, part) = (task / panels_per_matrix, task % panels_per_matrix);
            let start = part * panel;
            let len = panel.min(side - start);
            let (mut oa, mut ob, mut oc) = (offsets_a[matrix], offsets_b[matrix], matrix * m * n);
            let (rows, cols) = if split_rows {
                oa += ma.row_offset(start);
                oc += start * n;
                (len, n)
            } else {
                ob += mb.col_offset(start);
                oc += start;
                (m, len)
            };
            // SAFETY: the offsets stay inside the operands (their layouts were checked by
            // MatrixLayout::of) and each task writes its own rows or columns of `out`.
            unsafe {
                T::gemm(
                    ma.flag(),
                    mb.flag(),
                    (rows, cols, k),
                    a.as_ptr().add(oa),
                    ma.leading,
                    b.as_ptr().add(ob),
                    mb.leading,
                    out_ptr.ptr().add(oc),
                    n,
                )
            }
        });
        // SAFETY: every element was written by exactly one panel's product (the panels tile
        // each matrix, `panels_tile_each_matrix_for_any_thread_count`), and MaybeUninit<T> has
        // T's layout.
        let mut out = std::mem::ManuallyDrop::new(out);
        let out = unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<T>(), len, out.capacity()) };
        Ok((out, shape))
    }

    /// How a product of `matrices` (m x n) outputs is cut into tasks for `threads` threads.
    #[derive(Debug)]
    pub(super) struct Panels {
        /// Panels are row ranges, else column ranges.
        pub split_rows: bool,
        /// Rows (or columns) of one output.
        pub side: usize,
        /// Rows (or columns) per panel; the last panel of a matrix may be shorter.
        pub panel: usize,
        pub per_matrix: usize,
    }

    impl Panels {
        /// Each matrix is split along its longer output side so every thread gets work even
        /// for a single matrix; with at least as many matrices as threads, a panel is a matrix.
        pub fn plan(m: usize, n: usize, matrices: usize, threads: usize) -> Self {
            let split_rows = m >= n;
            let side = if split_rows { m } else { n };
            let asked = if matrices >= threads {
                1
            } else {
                threads
                    .div_ceil(matrices)
                    .min(side.div_ceil(MIN_PANEL))
                    .max(1)
            };
            let panel = side.div_ceil(asked);
            Self {
                split_rows,
                side,
                panel,
                // Rounding the panel up can leave fewer non-empty panels than asked for.
                per_matrix: side.div_ceil(panel),
            }
        }
    }

    /// The product as a candle op, differentiable through itself.
    pub struct BlasMatmul;

    impl CustomOp2 for BlasMatmul {
        fn name(&self) -> &'static str {
            "blas-matmul"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            static SERIAL: Once = Once::new();
            // SAFETY: sets a global of the library; the split over candle's pool is the parallelism.
            SERIAL.call_once(|| unsafe { openblas_set_num_threads(1) });
            match (s1, s2) {
                (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                    let (c, shape) = product(a, l1, b, l2)?;
                    Ok((CpuStorage::F32(c), shape))
                }
                (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                    let (c, shape) = product(a, l1, b, l2)?;
                    Ok((CpuStorage::F64(c), shape))
                }
                _ => candle_core::bail!("blas matmul: f32 or f64 operands of one dtype"),
            }
        }

        fn bwd(
            &self,
            a: &Tensor,
            b: &Tensor,
            _product: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let grad_a = super::matmul(grad, &b.t()?)?;
            let grad_b = super::matmul(&a.t()?, grad)?;
            Ok((Some(grad_a), Some(grad_b)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The product in f64 by the definition, as the reference.
    fn reference(a: &Tensor, b: &Tensor) -> Vec<f64> {
        let a64 = a.to_dtype(DType::F64).unwrap().contiguous().unwrap();
        let b64 = b.to_dtype(DType::F64).unwrap().contiguous().unwrap();
        let r = a.rank();
        let (m, k, n) = (
            a.dim(r - 2).unwrap(),
            a.dim(r - 1).unwrap(),
            b.dim(r - 1).unwrap(),
        );
        let batch: usize = a.dims()[..r - 2].iter().product();
        let av = a64.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bv = b64.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut c = vec![0.0; batch * m * n];
        for t in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    c[(t * m + i) * n + j] = (0..k)
                        .map(|p| av[(t * m + i) * k + p] * bv[(t * k + p) * n + j])
                        .sum();
                }
            }
        }
        c
    }

    fn assert_matches(a: &Tensor, b: &Tensor, tolerance: f64) {
        let got = matmul(a, b).unwrap();
        let want = reference(a, b);
        let got = got
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn products_of_every_layout_match_the_definition() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let rand = |shape: &[usize]| {
                Tensor::randn(0f64, 1., shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // Plain, transposed right (x W^T), transposed left (dy^T x), both transposed.
            for (m, k, n) in [(70, 33, 129), (1, 40, 300), (300, 40, 1), (5, 1, 7)] {
                assert_matches(&rand(&[m, k]), &rand(&[k, n]), tol);
                assert_matches(&rand(&[m, k]), &rand(&[n, k]).t().unwrap(), tol);
                assert_matches(&rand(&[k, m]).t().unwrap(), &rand(&[k, n]), tol);
                assert_matches(
                    &rand(&[k, m]).t().unwrap(),
                    &rand(&[n, k]).t().unwrap(),
                    tol,
                );
            }
            // Batched, as attention uses it: heads split out of a wider row, keys transposed.
            let q = rand(&[2, 5, 3, 16]).transpose(1, 2).unwrap();
            let kt = rand(&[2, 7, 3, 16]).transpose(1, 2).unwrap().t().unwrap();
            assert_matches(&q, &kt, tol);
            // A narrowed operand (an offset into its storage).
            let wide = rand(&[9, 50]);
            assert_matches(&wide.narrow(1, 10, 20).unwrap(), &rand(&[20, 6]), tol);
        }
    }

    /// Whatever the thread count and shape, the panels of a matrix are non-empty and tile its
    /// side exactly. (With 35 threads over 1,121 rows, panels of 33 rows leave only 34 of the 35
    /// asked-for panels holding rows: counted before the rounding, the last one started past
    /// the matrix and BLAS wrote out of bounds.)
    #[cfg(rewind_openblas)]
    #[test]
    fn panels_tile_each_matrix_for_any_thread_count() {
        use super::blas::Panels;
        for threads in 1..=80 {
            for (m, n, matrices) in [
                (1121, 5, 1),
                (5, 1121, 1),
                (64, 64, 3),
                (1, 1, 1),
                (33, 2, 40),
            ] {
                let p = Panels::plan(m, n, matrices, threads);
                let starts: Vec<usize> = (0..p.per_matrix).map(|i| i * p.panel).collect();
                assert!(
                    starts.iter().all(|&s| s < p.side),
                    "{threads} {m}x{n}: {p:?}"
                );
                let covered: usize = starts.iter().map(|&s| p.panel.min(p.side - s)).sum();
                assert_eq!(covered, p.side, "{threads} {m}x{n}: {p:?}");
            }
        }
        let p = Panels::plan(1121, 8, 1, 35);
        assert_eq!((p.panel, p.per_matrix), (33, 34));
    }

    #[test]
    fn gradients_match_candles_matmul() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 6, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 4, 5), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f64, 1., (2, 6, 4), &dev).unwrap();
        let loss = |c: Tensor| (c * &weights).unwrap().sum_all().unwrap();
        let ours = loss(matmul(a.as_tensor(), &b.t().unwrap()).unwrap())
            .backward()
            .unwrap();
        let candles = loss(a.as_tensor().matmul(&b.t().unwrap()).unwrap())
            .backward()
            .unwrap();
        for v in [&a, &b] {
            let diff =
                crate::model::ops::max_abs_diff(ours.get(v).unwrap(), candles.get(v).unwrap());
            assert!(diff < 1e-12, "{diff}");
        }
    }
}
