//! Hugging Face model directories: `config.json` plus one or more `*.safetensors` shards.

use crate::model::config::ModelConfig;
use crate::model::linear::Weight;
use crate::model::loader::{WeightFormat, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct SafetensorsSource {
    dir: PathBuf,
    tensors: MmapedSafetensors,
    /// Names present in any shard.
    names: std::collections::HashSet<String>,
    pub config: ModelConfig,
    /// The raw `config.json`, which may carry rewind's own settings.
    pub raw_config: serde_json::Value,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_hf_file(&config_path)?;
        let raw_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
        let shards = shard_files(dir)?;
        // Safety: the files are mapped read-only; rewind never writes a model file in place
        // (saves go to a temporary directory that is renamed).
        let tensors = unsafe { MmapedSafetensors::multi(&shards) }
            .map_err(|e| anyhow::anyhow!("{}: unreadable safetensors ({e})", dir.display()))?;
        let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            tensors,
            names,
            config,
            raw_config,
        })
    }
}

/// The shard list: from `model.safetensors.index.json` when present, else every
/// `*.safetensors` file in the directory.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = value["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no `weight_map`", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    Ok(files)
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn load(&self, name: &str, format: WeightFormat, device: &Device) -> Result<Weight> {
        if !self.contains(name) {
            bail!("{}: missing tensor `{name}`", self.dir.display());
        }
        let t = self
            .tensors
            .load(name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", self.dir.display()))?;
        let quantizable = t.rank() == 2 && t.dims()[1] % GgmlDType::Q8_0.block_size() == 0;
        if format == WeightFormat::Quantized && quantizable {
            let q = QTensor::quantize_onto(&t.to_dtype(DType::F32)?, GgmlDType::Q8_0, device)?;
            return Ok(Weight::Quantized(Arc::new(q)));
        }
        Ok(Weight::Dense(
            t.to_dtype(format.dense_dtype())?.to_device(device)?,
        ))
    }
}
