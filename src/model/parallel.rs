//! Loops split over candle's CPU thread pool, the one its own elementwise ops run on: rewind's
//! kernels and candle's share one set of threads, where a second pool's threads would spin on
//! the same cores waiting for work.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Mutex;

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

/// Elements per task of the elementwise kernels' loops: enough work to outweigh handing out
/// a task, small enough that the threads finish together.
pub const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Threads of the pool (its workers and the calling thread).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Calls `task(i)` once for each `i` in `0..n`, spread over the pool.
///
/// A task that panics does not take the pool down: candle's pool re-raises a worker's panic
/// while it holds its lock, which poisons the lock for every later CPU op, so each task's panic
/// is caught on its thread and the first one re-raised here, after the pool is released. Tasks
/// must not start parallel work of their own: the calling thread runs a share of the tasks
/// while holding that lock.
pub fn for_each(n: usize, task: impl Fn(usize) + Sync) {
    let panicked: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| range.for_each(&task))) {
            let mut first = panicked.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(panic);
        }
    });
    if let Some(panic) = panicked.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(panic);
    }
}

/// Whether candle's CPU pool still runs work. A panic inside one of candle's own parallel ops
/// (not rewind's, see [`for_each`]) poisons its lock, after which every CPU op fails: a server
/// that sees this must stop saying it is healthy.
pub fn pool_is_usable() -> bool {
    catch_unwind(|| candle_core::utils::barrier_pool().execute_chunked(1, |_| {})).is_ok()
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
    map_chunks(data, row_len, f)
}

/// Calls `f(c, chunk)` on each `chunk_len`-long chunk of `data` (the last may be shorter) in
/// parallel; the results, in chunk order.
pub fn map_chunks<T: Send, R: Send + Default + Clone>(
    data: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    assert!(chunk_len > 0, "empty chunks");
    let (len, chunks) = (data.len(), data.len().div_ceil(chunk_len));
    let mut results = vec![R::default(); chunks];
    let (data, out) = (
        SharedMut(data.as_mut_ptr()),
        SharedMut(results.as_mut_ptr()),
    );
    for_each(chunks, |c| {
        let start = c * chunk_len;
        // SAFETY: `for_each` runs each index once, so chunk c and result slot c are borrowed
        // by this call alone, and both lie inside their buffers.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(data.ptr().add(start), chunk_len.min(len - start))
        };
        let value = f(c, chunk);
        unsafe { *out.ptr().add(c) = value };
    });
    results
}

/// Calls `f(c, chunks)` with the matching `chunk_len`-long chunks of `K` equally long slices
/// (the last may be shorter), in parallel: kernels with several outputs.
pub fn for_each_chunks<T: Send, const K: usize>(
    slices: [&mut [T]; K],
    chunk_len: usize,
    f: impl Fn(usize, [&mut [T]; K]) + Sync,
) {
    let len = slices.first().map_or(0, |s| s.len());
    assert!(
        chunk_len > 0 && slices.iter().all(|s| s.len() == len),
        "mismatched chunks"
    );
    let starts = slices.map(|s| SharedMut(s.as_mut_ptr()));
    for_each(len.div_ceil(chunk_len), |c| {
        let (start, n) = (c * chunk_len, chunk_len.min(len - c * chunk_len));
        // SAFETY: as in `map_chunks`: chunk c of each slice belongs to this call alone, and the
        // slices are distinct `&mut` borrows.
        let chunks =
            starts.map(|p| unsafe { std::slice::from_raw_parts_mut(p.ptr().add(start), n) });
        f(c, chunks);
    });
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

    #[test]
    fn chunks_cover_a_ragged_tail_once() {
        let mut data = vec![0u32; 1003];
        let lens = map_chunks(&mut data, 100, |c, chunk| {
            chunk.iter_mut().for_each(|x| *x += 1 + c as u32);
            chunk.len()
        });
        assert_eq!(lens, [vec![100; 10], vec![3]].concat());
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &x)| x == 1 + (i / 100) as u32));
        let (mut a, mut b) = (vec![0u32; 1003], vec![0u32; 1003]);
        for_each_chunks([&mut a, &mut b], 100, |c, [a, b]| {
            a.iter_mut().for_each(|x| *x += c as u32);
            b.iter_mut().for_each(|x| *x += 1);
        });
        assert!(a.iter().enumerate().all(|(i, &x)| x == (i / 100) as u32));
        assert!(b.iter().all(|&x| x == 1));
    }

    /// A panicking task reaches the caller, and the pool (whose lock a panic re-raised inside
    /// it would poison) still runs the next op.
    #[test]
    fn a_panicking_task_leaves_the_pool_usable() {
        let caught = catch_unwind(|| {
            for_each(64, |i| {
                if i == 17 {
                    panic!("task 17");
                }
            })
        });
        let message = caught.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"task 17"));
        assert!(pool_is_usable());
        let mut data = vec![0u32; 100];
        map_chunks(&mut data, 10, |_, c| c.iter_mut().for_each(|x| *x = 1));
        assert!(data.iter().all(|&x| x == 1));
    }
}
