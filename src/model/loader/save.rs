//! Saving a model as a directory rewind (and Hugging Face tools) can load: `config.json` with a
//! `rewind` section holding the reversible settings, `model.safetensors`, tokenizer files.
//! Published whole with [`crate::durable::publish_dir`] (a temporary sibling directory, fsynced,
//! swapped in for any previous version), so a crash or power loss never leaves half a model.

use crate::model::decoder::Model;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::TextTokenizer;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` (dense, in `dtype`) with its tokenizer and chat template to `dir`, replacing
/// any previous content atomically and durably.
pub fn save_model(
    model: &Model,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    crate::durable::publish_dir(dir, |tmp| {
        write_model(model, tokenizer, template, tmp, dtype)
    })
    .with_context(|| format!("saving the model to {}", dir.display()))
}

/// The files of a model directory, written into `tmp`.
fn write_model(
    model: &Model,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    tmp: &Path,
    dtype: DType,
) -> Result<()> {
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
    tokenizer.save_hf(tmp)?;
    template.save_hf(tmp)
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}
