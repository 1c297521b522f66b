//! Whether a batch fits the memory the device has free, from the per-sample cost measured on
//! the model itself: two probe steps (batch 1 and 2 at the longest sequence) through the
//! strategy that will train, their peaks taken phase by phase (`memory::phases`). A batch that
//! cannot fit is refused before the first step, with the estimate, instead of ending in an
//! allocation abort; an "auto" batch is lowered to what fits. Two small batches overestimate a
//! sample where a cost still grows with them that stops growing later (an MLP tile of 512 rows not
//! yet full at short sequences): the plan errs on the side of fitting.

use crate::memory::{self, phases};
use crate::train::backward::{loss_and_grads, Batch, Strategy};
use crate::train::exact::FixedPoint;
use crate::train::loss::{Objective, Targets};
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// What to do with the batch size once the memory it needs is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchRule {
    /// The batch was asked for: refuse it if it cannot fit.
    Required,
    /// The batch is an upper bound ("auto"): lower it to the largest that fits.
    AtMost,
}

/// Share of the free memory a run plans to use: the probe's estimate leaves room for what it
/// cannot see (allocator slack, the rest of the process).
const USABLE_SHARE: f64 = 0.8;

/// The memory plan of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryFit {
    pub seq: usize,
    pub bytes_per_sample: f64,
    pub fixed_bytes: f64,
    pub available_bytes: u64,
    /// The largest batch of `seq`-token sequences that fits.
    pub max_batch: usize,
    /// The batch the run will use.
    pub batch: usize,
}

impl MemoryFit {
    pub fn describe(&self) -> String {
        format!(
            "{:.1} MiB per sample of {} tokens and {:.0} MiB besides, {:.1} GiB free: at most {} sequences fit",
            self.bytes_per_sample / (1u64 << 20) as f64,
            self.seq,
            self.fixed_bytes.max(0.0) / (1u64 << 20) as f64,
            self.available_bytes as f64 / (1u64 << 30) as f64,
            self.max_batch
        )
    }
}

/// `size` sequences of `seq` tokens of made-up ids, every token trained: the shape of a batch,
/// for measurements.
pub fn synthetic_batch(
    size: usize,
    seq: usize,
    vocab: usize,
    device: &Device,
) -> Result<Batch<'static>> {
    let ids: Vec<u32> = (0..size * (seq + 1))
        .map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let all = Tensor::from_vec(ids, (size, seq + 1), device)?;
    Ok(Batch {
        inputs: all.narrow(1, 0, seq)?.contiguous()?,
        targets: Targets {
            ids: all.narrow(1, 1, seq)?.flatten_all()?,
            weights: Tensor::ones(size * seq, DType::F32, device)?,
        },
        objective: Objective::NextToken,
    })
}

/// The batch a run of `requested` sequences of up to `seq` tokens can use, or an error naming
/// the estimate and the largest that fits. None when memory cannot be measured here (no counted
/// heap, or the free memory is unknown): the run goes on as asked.
pub fn fit_batch(
    t: &Trainable,
    strategy: Strategy,
    exact: Option<FixedPoint>,
    seq: usize,
    requested: usize,
    rule: BatchRule,
) -> Result<Option<MemoryFit>> {
    let device = t.frozen.device.clone();
    if device.is_cpu() && !memory::is_installed() {
        return Ok(None);
    }
    let Some(available) = memory::device::available_bytes(&device)? else {
        return Ok(None);
    };
    // AdamW's two moments per trained parameter, allocated after this probe.
    let optimizer_bytes: usize = t.vars.iter().map(|v| 8 * v.elem_count()).sum();
    let vocab = t.frozen.config.vocab_size;
    let step = |size: usize| -> Result<phases::PhasePeaks> {
        let batch = synthetic_batch(size, seq, vocab, &device)?;
        let (_, peaks) = phases::measure(&device, || {
            loss_and_grads(t, &batch, strategy, 1.0, exact).map(drop)
        })?;
        Ok(peaks)
    };
    // The first step also allocates what later steps reuse; it is not measured.
    step(1)?;
    let (one, two) = (step(1)?, step(2)?);
    let cost = phases::per_sample((1, &one), (2, &two));
    if cost.bytes_per_sample <= 0.0 {
        // Other threads' frees hid the growth: nothing to go by.
        return Ok(None);
    }
    let usable =
        available as f64 * USABLE_SHARE - cost.fixed_bytes.max(0.0) - optimizer_bytes as f64;
    let max_batch = (usable / cost.bytes_per_sample).floor().max(0.0) as usize;
    let mut fit = MemoryFit {
        seq,
        bytes_per_sample: cost.bytes_per_sample,
        fixed_bytes: cost.fixed_bytes,
        available_bytes: available,
        max_batch,
        batch: requested.min(max_batch),
    };
    if fit.batch == 0 || (rule == BatchRule::Required && requested > max_batch) {
        bail!(
            "batch_size {requested} does not fit in memory: {}",
            fit.describe()
        );
    }
    if rule == BatchRule::Required {
        fit.batch = requested;
    }
    Ok(Some(fit))
}
