//! Admission control for continuous batching: which waiting requests join the running batch
//! at the next decode step. Pure bookkeeping with no model, clock or channel, so every rule is
//! unit-tested directly.
//!
//! Rules:
//! - first come, first served: a request that does not fit blocks the ones behind it (skipping
//!   it would let a stream of small requests starve a large one);
//! - at most `max_batch` sequences run at once (each choice of `n` is a sequence);
//! - the KV caches of running sequences stay within `kv_budget` bytes, counting each sequence at
//!   its worst case (prompt plus `max_tokens`), so a running sequence never has to be evicted;
//! - one step prefills at most `max_prefill_tokens` prompt tokens, so a burst of new prompts
//!   does not stall the streams already running for long; a longer prompt is still admitted,
//!   alone, when it is at the head of the queue.

use std::collections::{HashMap, VecDeque};

/// What one request needs once admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Sequences (prompts x choices).
    pub seqs: usize,
    /// Worst-case KV cache bytes of one sequence.
    pub kv_bytes_per_seq: usize,
    /// Prompt tokens the admission step will prefill (all sequences together).
    pub prefill_tokens: usize,
}

impl Demand {
    pub fn kv_bytes(&self) -> usize {
        self.seqs.saturating_mul(self.kv_bytes_per_seq)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    pub max_batch: usize,
    pub kv_budget: usize,
    pub max_prefill_tokens: usize,
}

/// Why a request can never be admitted, whatever else is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unschedulable {
    /// More sequences than a batch holds.
    TooManySequences { seqs: usize, max_batch: usize },
    /// Its worst-case KV caches exceed the whole budget.
    KvBudget { needed: usize, budget: usize },
}

#[derive(Debug)]
pub struct Scheduler<K> {
    limits: SchedulerLimits,
    waiting: VecDeque<(K, Demand)>,
    /// Admitted requests: sequences still running and the bytes each one holds.
    running: HashMap<K, (usize, usize)>,
    running_seqs: usize,
    reserved: usize,
}

impl<K: Copy + Eq + std::hash::Hash> Scheduler<K> {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            running_seqs: 0,
            reserved: 0,
        }
    }

    pub fn limits(&self) -> SchedulerLimits {
        self.limits
    }

    /// Checked before a request is queued, so a request that could never run is rejected
    /// up front instead of blocking the queue forever.
    pub fn check(limits: &SchedulerLimits, demand: &Demand) -> Result<(), Unschedulable> {
        if demand.seqs > limits.max_batch {
            return Err(Unschedulable::TooManySequences {
                seqs: demand.seqs,
                max_batch: limits.max_batch,
            });
        }
        if demand.kv_bytes() > limits.kv_budget {
            return Err(Unschedulable::KvBudget {
                needed: demand.kv_bytes(),
                budget: limits.kv_budget,
            });
        }
        Ok(())
    }

    /// Queues a request (already checked with [`Scheduler::check`]).
    pub fn push(&mut self, key: K, demand: Demand) {
        self.waiting.push_back((key, demand));
    }

    /// Takes a request out of the queue (its client left); false if it was not waiting.
    pub fn remove_waiting(&mut self, key: K) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|(k, _)| *k != key);
        self.waiting.len() != before
    }

    /// The requests that join the batch now, in arrival order.
    pub fn admit(&mut self) -> Vec<K> {
        let mut admitted = Vec::new();
        let mut prefill = 0usize;
        while let Some(&(key, demand)) = self.waiting.front() {
            let fits_batch = self.running_seqs + demand.seqs <= self.limits.max_batch;
            let fits_kv = self.reserved + demand.kv_bytes() <= self.limits.kv_budget;
            let fits_prefill = admitted.is_empty()
                || prefill + demand.prefill_tokens <= self.limits.max_prefill_tokens;
            if !(fits_batch && fits_kv && fits_prefill) {
                break;
            }
            self.waiting.pop_front();
            self.running_seqs += demand.seqs;
            self.reserved += demand.kv_bytes();
            prefill += demand.prefill_tokens;
            self.running
                .insert(key, (demand.seqs, demand.kv_bytes_per_seq));
            admitted.push(key);
        }
        admitted
    }

    /// One sequence of an admitted request ended (finished, failed or cancelled): its batch
    /// slot and KV reservation are free again.
    pub fn release_seq(&mut self, key: K) {
        if let Some((left, bytes)) = self.running.get_mut(&key) {
            *left -= 1;
            self.running_seqs -= 1;
            self.reserved -= *bytes;
            if *left == 0 {
                self.running.remove(&key);
            }
        }
    }

    /// Releases every remaining sequence of an admitted request.
    pub fn release_all(&mut self, key: K) {
        if let Some((left, bytes)) = self.running.remove(&key) {
            self.running_seqs -= left;
            self.reserved -= left * bytes;
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_seqs(&self) -> usize {
        self.running_seqs
    }

    pub fn reserved_bytes(&self) -> usize {
        self.reserved
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_batch: usize, kv_budget: usize, max_prefill_tokens: usize) -> SchedulerLimits {
        SchedulerLimits {
            max_batch,
            kv_budget,
            max_prefill_tokens,
        }
    }

    fn demand(seqs: usize, kv: usize, prefill: usize) -> Demand {
        Demand {
            seqs,
            kv_bytes_per_seq: kv,
            prefill_tokens: prefill,
        }
    }

    #[test]
    fn admits_up_to_the_batch_size_then_as_slots_free() {
        let mut s = Scheduler::new(limits(3, 1000, 1000));
        for k in 0..5 {
            s.push(k, demand(1, 10, 5));
        }
        assert_eq!(s.admit(), [0, 1, 2]);
        assert_eq!((s.running_seqs(), s.waiting()), (3, 2));
        assert!(s.admit().is_empty());
        s.release_seq(1);
        assert_eq!(s.admit(), [3]);
        s.release_seq(0);
        s.release_seq(2);
        assert_eq!(s.admit(), [4]);
        for k in [3, 4] {
            s.release_seq(k);
        }
        assert!(s.is_idle());
        assert_eq!((s.running_seqs(), s.reserved_bytes()), (0, 0));
    }

    #[test]
    fn kv_budget_counts_worst_cases() {
        let mut s = Scheduler::new(limits(100, 100, 1000));
        s.push('a', demand(2, 30, 1)); // 60
        s.push('b', demand(1, 50, 1)); // would make 110
        s.push('c', demand(1, 25, 1));
        assert_eq!(s.admit(), ['a']);
        // 'c' would fit but waits behind 'b': first come, first served.
        assert!(s.admit().is_empty());
        s.release_seq('a');
        assert_eq!(s.reserved_bytes(), 30);
        // 30 + 50 fits, 30 + 50 + 25 does not.
        assert_eq!(s.admit(), ['b']);
        s.release_all('a');
        assert_eq!(s.admit(), ['c']);
        assert_eq!(s.reserved_bytes(), 75);
    }

    #[test]
    fn prefill_tokens_are_spread_over_steps() {
        let mut s = Scheduler::new(limits(100, 1 << 30, 100));
        s.push(1, demand(1, 1, 60));
        s.push(2, demand(1, 1, 60));
        s.push(3, demand(1, 1, 500));
        assert_eq!(s.admit(), [1]);
        assert_eq!(s.admit(), [2]);
        // Longer than the per-step limit, but alone at the head: admitted by itself.
        assert_eq!(s.admit(), [3]);
    }

    #[test]
    fn waiting_requests_can_leave() {
        let mut s = Scheduler::new(limits(1, 100, 100));
        s.push(1, demand(1, 1, 1));
        s.push(2, demand(1, 1, 1));
        s.push(3, demand(1, 1, 1));
        assert_eq!(s.admit(), [1]);
        assert!(s.remove_waiting(2));
        assert!(!s.remove_waiting(2));
        s.release_all(1);
        assert_eq!(s.admit(), [3]);
        // Releasing an unknown key is harmless.
        s.release_seq(42);
        assert_eq!(s.running_seqs(), 1);
    }

    #[test]
    fn impossible_requests_are_rejected_up_front() {
        let l = limits(4, 100, 10);
        assert_eq!(
            Scheduler::<u8>::check(&l, &demand(5, 1, 1)),
            Err(Unschedulable::TooManySequences {
                seqs: 5,
                max_batch: 4
            })
        );
        assert_eq!(
            Scheduler::<u8>::check(&l, &demand(2, 60, 1)),
            Err(Unschedulable::KvBudget {
                needed: 120,
                budget: 100
            })
        );
        assert_eq!(Scheduler::<u8>::check(&l, &demand(4, 25, 1000)), Ok(()));
    }
}
