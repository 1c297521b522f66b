//! Saving a model as a directory rewind (and Hugging Face tools) can load: `config.json` with a
//! `rewind` section holding the reversible settings, `model.safetensors`, tokenizer files.
//! Written into a temporary sibling directory and renamed, so a crash never leaves half a model.

use crate::model::chat_template::ChatTemplate;
use crate::model::decoder::Model;
use crate::model::tokenizer::TextTokenizer;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` (dense, in `dtype`) with its tokenizer and chat template to `dir`, replacing
/// any previous content atomically.
pub fn save_model(
    model: &Model,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let mut model = model.clone();
    model.densify()?;
    model.merge_lora()?;
    let mut config = model.config.clone();
    config.tie_word_embeddings = model.lm_head.is_none();
    let mut config_json = config.to_hf_json();
    config_json["rewind"] = serde_json::json!({ "reversible": model.reversible });
    config_json["torch_dtype"] = serde_json::json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    write_json(&tmp.join("config.json"), &config_json)?;

    let tensors: HashMap<String, Tensor> = model
        .parameters_mut()
        .into_iter()
        .map(|(name, t)| {
            Ok((
                name,
                t.to_dtype(dtype)?.to_device(&candle_core::Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
        .context("writing model.safetensors")?;
    tokenizer.save_hf(&tmp)?;
    template.save_hf(&tmp)?;

    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old)?;
        std::fs::rename(&tmp, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("moving the saved model to {}", dir.display()))?;
    }
    Ok(())
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}
