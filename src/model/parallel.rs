//! Loops split over candle's CPU thread pool, the one its own elementwise ops run on: rewind's
//! kernels and candle's share one set of threads, where a second pool's threads would spin on
//! the same cores waiting for work.

/// A raw pointer that may cross threads, for tasks that each write their own disjoint part.
pub struct SharedMut<T>(pub *mut T);
// By hand: derived impls would ask T itself to be Copy.
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
// SAFETY: only handed to tasks that write disjoint elements (each user says why).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so closures capture the wrapper rather than its raw pointer.
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

/// Threads of the pool (its workers and the calling thread).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Calls `task(i)` once for each `i` in `0..n`, spread over the pool.
///
/// Tasks must not panic (the panic would reach the caller, but poison the pool's lock for
/// every later candle CPU op) and must not start parallel work of their own: the calling
/// thread runs a share of the tasks while holding that lock.
pub fn for_each(n: usize, task: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&task));
}

/// Calls `f(r, row)` on each `row_len`-long row of `data` in parallel; the results, in row
/// order.
pub fn map_rows<T: Send, R: Send + Default + Clone>(
    data: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    assert!(
        row_len > 0 && data.len().is_multiple_of(row_len),
        "ragged rows"
    );
    let rows = data.len() / row_len;
    let mut results = vec![R::default(); rows];
    let (data, out) = (
        SharedMut(data.as_mut_ptr()),
        SharedMut(results.as_mut_ptr()),
    );
    for_each(rows, |r| {
        // SAFETY: `for_each` runs each index once, so row r and result slot r are borrowed by
        // this call alone, and both lie inside their buffers.
        let row = unsafe { std::slice::from_raw_parts_mut(data.ptr().add(r * row_len), row_len) };
        let value = f(r, row);
        unsafe { *out.ptr().add(r) = value };
    });
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once_with_its_own_index() {
        let mut data = vec![0u32; 7 * 1000];
        let sums = map_rows(&mut data, 7, |r, row| {
            row.iter_mut().for_each(|x| *x += r as u32);
            r * 7
        });
        assert_eq!(sums, (0..1000).map(|r| r * 7).collect::<Vec<_>>());
        assert!(data
            .chunks(7)
            .enumerate()
            .all(|(r, row)| row.iter().all(|&x| x == r as u32)));
    }
}
