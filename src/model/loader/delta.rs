//! Delta models: a small directory holding the reversible settings and the parameters that
//! changed, applied on top of a base model file. This is how rewind ships a converted model
//! without shipping (or re-running) the whole conversion: `delta.json` names the base file
//! (with its sha256) and `weights.safetensors` holds the changed tensors.

use crate::model::decoder::Model;
use crate::model::loader::{load, LoadOptions, LoadedModel};
use crate::model::reversible::ReversibleConfig;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaManifest {
    /// File name of the base model, looked up beside the delta directory.
    pub base: String,
    pub reversible: ReversibleConfig,
    /// Number of parameters the delta replaces.
    pub parameters: usize,
}

pub fn is_delta(path: &Path) -> bool {
    path.join("delta.json").exists()
}

/// The manifest of a delta directory.
pub fn manifest(dir: &Path) -> Result<DeltaManifest> {
    let path = dir.join("delta.json");
    serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: invalid delta manifest", path.display()))
}

/// Writes `model`'s parameters (only the norms when `norms_only`) and scheme as a delta over
/// `base` into `dir`.
pub fn save(model: &mut Model, base: &Path, norms_only: bool, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let parameters = write_weights(model, norms_only, &dir.join("weights.safetensors"))?;
    let manifest = DeltaManifest {
        base: base
            .file_name()
            .and_then(|n| n.to_str())
            .context("base model path has no file name")?
            .to_string(),
        reversible: model.reversible.clone(),
        parameters,
    };
    std::fs::write(
        dir.join("delta.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
}

/// Writes `model`'s parameters (only the norms when `norms_only`) to the safetensors file
/// `path`, atomically; returns how many scalars it holds.
pub fn write_weights(model: &mut Model, norms_only: bool, path: &Path) -> Result<usize> {
    let tensors: HashMap<String, Tensor> = model
        .parameters_mut()
        .into_iter()
        .filter(|(n, _)| !norms_only || n.contains("norm"))
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(tensors.values().map(Tensor::elem_count).sum())
}

/// Replaces parameters of `model` by those stored in `path`.
pub fn apply(model: &mut Model, path: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let device = model.device.clone();
    let mut found = 0;
    for (name, t) in model.parameters_mut() {
        if let Some(new) = tensors.get(&name) {
            if new.dims() != t.dims() {
                bail!(
                    "{}: `{name}` has shape {:?}, the model has {:?}",
                    path.display(),
                    new.dims(),
                    t.dims()
                );
            }
            *t = new.to_dtype(t.dtype())?.to_device(&device)?;
            found += 1;
        }
    }
    if found != tensors.len() {
        bail!(
            "{}: {} of its {} tensors match no parameter of the base model",
            path.display(),
            tensors.len() - found,
            tensors.len()
        );
    }
    Ok(())
}

/// Loads the base model (beside `dir` or in the models directory), switches it to the recorded scheme and applies the delta.
/// Quantized bases keep their quantized matrices under `Quantized` (the delta is dense).
pub fn load_delta(dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let manifest = manifest(dir)?;
    // Beside the delta, else in the models directory where `rewind pull` puts known models.
    let beside = dir.parent().unwrap_or(Path::new(".")).join(&manifest.base);
    let pulled = crate::provision::models_dir().join(&manifest.base);
    let Some(base) = [&beside, &pulled].into_iter().find(|p| p.exists()) else {
        bail!(
            "{}: its base model {} is neither beside it nor in {} (run `rewind pull`)",
            dir.display(),
            manifest.base,
            crate::provision::models_dir().display()
        );
    };
    let reversible = options.reversible.clone().unwrap_or(manifest.reversible);
    let mut loaded = load(
        base,
        &LoadOptions {
            reversible: Some(reversible),
            ..options.clone()
        },
    )?;
    apply(&mut loaded.model, &dir.join("weights.safetensors"))?;
    loaded.source = dir.to_path_buf();
    Ok(loaded)
}
