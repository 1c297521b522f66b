//! Resumable training checkpoints: trainable weights, optimizer moments and the loop's
//! position (step, epoch, batch, RNG seed), published with [`crate::durable::publish_dir`]
//! (written under a temporary name, fsynced, swapped in), so a crash or power loss at any point
//! leaves either the previous complete checkpoint or the new one, never a mix.

use crate::train::optimizer::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Where the loop stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Optimizer steps taken.
    pub step: usize,
    pub epoch: usize,
    /// Batches of the current epoch already consumed.
    pub batch_in_epoch: usize,
    pub seed: u64,
    /// (step, loss) so far, so a resumed run continues the same curve.
    pub losses: Vec<(usize, f64)>,
    pub trained_tokens: usize,
}

/// Saves `names`/`vars` (weights), the optimizer and `state` into `dir`.
pub fn save(
    dir: &Path,
    names: &[String],
    vars: &[Var],
    optimizer: &AdamW,
    state: &LoopState,
) -> Result<()> {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    let weights: HashMap<String, Tensor> = names
        .iter()
        .zip(vars)
        .map(|(n, v)| Ok((n.clone(), cpu(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    let mut moments = HashMap::new();
    for (n, (m, v)) in names.iter().zip(&optimizer.moments) {
        moments.insert(format!("{n}.m"), cpu(m)?);
        moments.insert(format!("{n}.v"), cpu(v)?);
    }
    let meta = serde_json::json!({ "loop": state, "optimizer_step": optimizer.step, "optimizer": optimizer.config });
    crate::durable::publish_dir(dir, |tmp| {
        candle_core::safetensors::save(&weights, tmp.join("weights.safetensors"))?;
        candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&meta)?)?;
        Ok(())
    })
    .with_context(|| format!("saving checkpoint {}", dir.display()))
}

/// Whether `dir` holds a checkpoint to resume from, after repairing a save a crash interrupted
/// (a previous checkpoint moved aside and not yet replaced is put back).
pub fn exists(dir: &Path) -> Result<bool> {
    crate::durable::recover_dir(dir)?;
    Ok(dir.join("state.json").exists())
}

/// Restores weights and optimizer from `dir` into `vars`/`optimizer`; returns the loop state.
pub fn load(
    dir: &Path,
    names: &[String],
    vars: &[Var],
    optimizer: &mut AdamW,
) -> Result<LoopState> {
    let read = |f: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(f);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    let weights = read("weights.safetensors")?;
    let moments = read("optimizer.safetensors")?;
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    for (i, (n, var)) in names.iter().zip(vars).enumerate() {
        let (Some(w), Some(m), Some(v)) = (
            weights.get(n),
            moments.get(&format!("{n}.m")),
            moments.get(&format!("{n}.v")),
        ) else {
            bail!(
                "checkpoint {} lacks `{n}`: it was written for another model or settings",
                dir.display()
            );
        };
        if w.dims() != var.dims() {
            bail!(
                "checkpoint {}: `{n}` has shape {:?}, the model has {:?}",
                dir.display(),
                w.dims(),
                var.dims()
            );
        }
        let dev = var.device();
        var.set(&w.to_dtype(var.dtype())?.to_device(dev)?)?;
        optimizer.moments[i] = (m.to_device(dev)?, v.to_device(dev)?);
    }
    optimizer.step = meta["optimizer_step"].as_u64().unwrap_or(0) as usize;
    serde_json::from_value(meta["loop"].clone())
        .with_context(|| format!("{}: bad state.json", dir.display()))
}
