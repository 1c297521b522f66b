//! Resumable training checkpoints: trainable weights, optimizer moments and the loop's
//! position (step, epoch, batch, RNG seed), written to a temporary directory and renamed so a
//! crash leaves either the previous checkpoint or the new one, never a mix.

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
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("checkpoint")
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    let weights: HashMap<String, Tensor> = names
        .iter()
        .zip(vars)
        .map(|(n, v)| Ok((n.clone(), cpu(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&weights, tmp.join("weights.safetensors"))?;
    let mut moments = HashMap::new();
    for (n, (m, v)) in names.iter().zip(&optimizer.moments) {
        moments.insert(format!("{n}.m"), cpu(m)?);
        moments.insert(format!("{n}.v"), cpu(v)?);
    }
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    let meta = serde_json::json!({ "loop": state, "optimizer_step": optimizer.step, "optimizer": optimizer.config });
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&meta)?)?;
    // fsync the files before the rename publishes them.
    for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("publishing checkpoint {}", dir.display()))?;
    Ok(())
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
