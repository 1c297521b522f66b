//! The peak memory of each named phase of one computation, for benchmarks.
//!
//! Per-sample memory is how fast a peak grows with the batch. Taken over the whole step, the
//! peak can sit where batch-independent costs are largest (the weight gradients complete at the
//! bottom of the walk down, the LM head's chunk) and hide a per-sample cost that peaks elsewhere
//! (checkpoint's kept input pairs, all alive at the top): the growth of that peak then reports
//! the same per-sample memory for every strategy. Measured phase by phase, each phase's growth
//! is its own per-sample cost, and the largest of them is what bounds the batch.

use anyhow::Result;
use candle_core::Device;
use std::sync::Mutex;

/// (phase, peak) of the computation being measured; None when nothing is.
static RECORD: Mutex<Option<Vec<(&'static str, usize)>>> = Mutex::new(None);

/// Ends the current phase of a measured computation (a no-op otherwise): its peak is recorded
/// under `name` and tracking restarts for the next.
pub fn mark(device: &Device, name: &'static str) -> Result<()> {
    let mut record = RECORD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(phases) = record.as_mut() {
        phases.push((name, super::device::peak_bytes(device)?));
        super::device::reset_peak(device)?;
    }
    Ok(())
}

/// Peak bytes above what was live before, per phase, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PhasePeaks(pub Vec<(&'static str, usize)>);

impl PhasePeaks {
    /// The highest peak of any phase.
    pub fn peak(&self) -> usize {
        self.0.iter().map(|p| p.1).max().unwrap_or(0)
    }
}

/// Runs `step` and returns its result with the peak of every phase it marked (what follows the
/// last mark is the phase `rest`).
pub fn measure<R>(device: &Device, step: impl FnOnce() -> Result<R>) -> Result<(R, PhasePeaks)> {
    let before = super::device::live_bytes(device)?;
    super::device::reset_peak(device)?;
    *RECORD.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    let result = step();
    mark(device, "rest")?;
    let phases = RECORD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let peaks = phases
        .into_iter()
        .map(|(name, peak)| (name, peak.saturating_sub(before)))
        .collect();
    Ok((result?, PhasePeaks(peaks)))
}

/// The per-sample cost of the phase whose peak grows fastest with the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PerSample {
    pub phase: &'static str,
    pub bytes_per_sample: f64,
    /// That phase's batch-independent part.
    pub fixed_bytes: f64,
}

/// From the phase peaks of the same step at two batch sizes (`small` < `large`).
pub fn per_sample(small: (usize, &PhasePeaks), large: (usize, &PhasePeaks)) -> PerSample {
    let samples = large.0.saturating_sub(small.0).max(1) as f64;
    let mut best = PerSample {
        phase: "rest",
        bytes_per_sample: 0.0,
        fixed_bytes: large.1.peak() as f64,
    };
    for (name, big) in &large.1 .0 {
        let Some((_, little)) = small.1 .0.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let slope = (*big as f64 - *little as f64) / samples;
        if slope > best.bytes_per_sample {
            best = PerSample {
                phase: name,
                bytes_per_sample: slope,
                fixed_bytes: *big as f64 - slope * large.0 as f64,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phase whose fixed cost is large but constant loses to one that grows with the batch.
    #[test]
    fn the_fastest_growing_phase_sets_the_per_sample_cost() {
        let small = PhasePeaks(vec![
            ("forward", 100 + 2 * 50),
            ("walk down", 1000 + 2 * 10),
        ]);
        let large = PhasePeaks(vec![
            ("forward", 100 + 8 * 50),
            ("walk down", 1000 + 8 * 10),
        ]);
        let got = per_sample((2, &small), (8, &large));
        assert_eq!(got.phase, "forward");
        assert_eq!((got.bytes_per_sample, got.fixed_bytes), (50.0, 100.0));
    }
}
