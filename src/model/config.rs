//! Architecture hyperparameters of a Llama-family decoder, named as in Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The decoder families rewind runs. Both are the same block (RMSNorm, RoPE, GQA, SwiGLU);
/// qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "mistral" | "llamaforcausallm" => Ok(Self::Llama),
            "qwen2" | "qwen2forcausallm" => Ok(Self::Qwen2),
            other => bail!(
                "unsupported architecture `{other}`: rewind runs `llama` and `qwen2` decoders"
            ),
        }
    }

    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// Hyperparameters; field names follow `config.json` so the file deserialises directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2). Absent in Llama configs.
    #[serde(default)]
    pub attention_bias: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Reads an HF `config.json`; qwen2 implies q/k/v biases even when the file does not say so.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        // Older configs name the family only in `architectures`.
        if value.get("model_type").is_none() {
            if let Some(arch) = value["architectures"].get(0).and_then(|a| a.as_str()) {
                value["model_type"] = serde_json::Value::String(arch.to_string());
            }
        }
        if let Some(kind) = value.get("model_type").and_then(|m| m.as_str()) {
            let arch = Architecture::parse(kind).with_context(|| path.display().to_string())?;
            value["model_type"] = serde_json::to_value(arch)?;
            if arch == Architecture::Qwen2 && value.get("attention_bias").is_none() {
                value["attention_bias"] = serde_json::Value::Bool(true);
            }
        }
        if value.get("num_key_value_heads").is_none() {
            value["num_key_value_heads"] = value["num_attention_heads"].clone();
        }
        let config: Self = serde_json::from_value(value)
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        config
            .validate()
            .with_context(|| path.display().to_string())?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            bail!("head counts must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim());
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            bail!("hidden_size, vocab_size and num_hidden_layers must be positive");
        }
        Ok(())
    }

    /// The JSON written into a saved model directory (HF-compatible fields).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        value["architectures"] = serde_json::json!([self.model_type.hf_class()]);
        value["head_dim"] = self.head_dim().into();
        value
    }
}
