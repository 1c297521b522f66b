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
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaManifest {
    /// The base model: a file name looked up beside the delta directory, or an absolute path.
    pub base: String,
    pub reversible: ReversibleConfig,
    /// Number of parameters the delta stores.
    pub parameters: usize,
    /// LoRA adapters the delta stores factors of, attached to the base before its tensors apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
}

/// Shape of the LoRA adapters of a delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names the adapters sit on (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
}

/// Which of a model's parameters a delta stores.
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaContents {
    /// The RMSNorm gains.
    Norms,
    /// The RMSNorm gains and the factors of these LoRA adapters (a few MB where the weights
    /// they adapt are hundreds).
    NormsAndAdapters(LoraSpec),
    /// Every parameter.
    All,
}

impl DeltaContents {
    fn keeps(&self, name: &str) -> bool {
        match self {
            Self::Norms => name.contains("norm"),
            Self::NormsAndAdapters(_) => name.contains("norm") || name.contains(".lora_"),
            Self::All => true,
        }
    }
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

/// Writes `model`'s parameters named by `contents` and its scheme as a delta over `base` into
/// `dir`.
pub fn save(model: &mut Model, base: &Path, contents: &DeltaContents, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let parameters = write_weights(model, contents, &dir.join("weights.safetensors"))?;
    let manifest = DeltaManifest {
        base: base_reference(base, dir)?,
        reversible: model.reversible.clone(),
        parameters,
        lora: match contents {
            DeltaContents::NormsAndAdapters(spec) => Some(spec.clone()),
            _ => None,
        },
    };
    std::fs::write(
        dir.join("delta.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
}

/// How the manifest names `base`: its file name when it lies beside the delta directory `dir`
/// (a shipped delta and its pulled base, both in the models directory), else its absolute path.
fn base_reference(base: &Path, dir: &Path) -> Result<String> {
    let folder = |p: &Path| {
        std::fs::canonicalize(
            p.parent()
                .filter(|f| !f.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .ok()
    };
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .context("base model path has no file name")?;
    if folder(base).is_some() && folder(base) == folder(dir) {
        return Ok(name.to_string());
    }
    let absolute =
        std::path::absolute(base).with_context(|| format!("resolving {}", base.display()))?;
    absolute
        .to_str()
        .map(String::from)
        .context("base model path is not UTF-8")
}

/// Writes `model`'s parameters named by `contents` to the safetensors file `path`, atomically;
/// returns how many scalars it holds.
pub fn write_weights(model: &mut Model, contents: &DeltaContents, path: &Path) -> Result<usize> {
    let tensors: HashMap<String, Tensor> = model
        .parameters_mut()
        .into_iter()
        .filter(|(n, _)| contents.keeps(n))
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::durable::replace_file(path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })?;
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

/// The base model file the delta in `dir` applies to; an error says how to get it if missing.
pub fn base_path(dir: &Path) -> Result<PathBuf> {
    base_path_of(dir, &manifest(dir)?)
}

fn base_path_of(dir: &Path, manifest: &DeltaManifest) -> Result<PathBuf> {
    let base = dir.parent().unwrap_or(Path::new(".")).join(&manifest.base);
    if !base.exists() {
        bail!(
            "{}: its base model {} is missing (run `rewind pull`)",
            dir.display(),
            base.display()
        );
    }
    Ok(base)
}

/// Loads the base model beside `dir` (or where the manifest's path points), switches it to the recorded scheme and applies the delta.
/// Quantized bases keep their quantized matrices under `Quantized` (the delta is dense).
pub fn load_delta(dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let manifest = manifest(dir)?;
    let base = base_path_of(dir, &manifest)?;
    let reversible = options.reversible.clone().unwrap_or(manifest.reversible);
    let mut loaded = load(
        &base,
        &LoadOptions {
            reversible: Some(reversible),
            ..options.clone()
        },
    )?;
    if let Some(lora) = &manifest.lora {
        let attached = loaded
            .model
            .add_lora(lora.rank, lora.alpha, &lora.targets, 0)?;
        if attached == 0 {
            bail!(
                "{}: its LoRA targets {:?} match no projection of the base",
                dir.display(),
                lora.targets
            );
        }
    }
    apply(&mut loaded.model, &dir.join("weights.safetensors"))?;
    if options.format != crate::model::loader::WeightFormat::Quantized {
        // Folded in, the adapters cost nothing at inference; quantized matrices keep them apart.
        loaded.model.merge_lora()?;
    }
    loaded.source = dir.to_path_buf();
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_a_base_beside_them_by_file_name_else_by_absolute_path() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.gguf");
        std::fs::write(&base, b"x").unwrap();
        let beside = tmp.path().join("m.delta");
        let elsewhere = tmp.path().join("sub").join("m.delta");
        std::fs::create_dir_all(&beside).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        assert_eq!(base_reference(&base, &beside).unwrap(), "base.gguf");
        let reference = base_reference(&base, &elsewhere).unwrap();
        // load_delta joins the reference to the delta's parent: an absolute path wins.
        let found = elsewhere.parent().unwrap().join(reference);
        assert_eq!(
            std::fs::canonicalize(found).unwrap(),
            std::fs::canonicalize(&base).unwrap()
        );
    }
}
