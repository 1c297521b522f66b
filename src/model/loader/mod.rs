//! Loading models: GGUF files, Hugging Face directories, and rewind's own saved directories
//! (HF layout whose `config.json` also records the reversible settings).

pub mod delta;
pub mod gguf;
pub mod random;
pub mod safetensors;
pub mod save;

use crate::model::block::{Attention, Block, Mlp};
use crate::model::config::ModelConfig;
use crate::model::decoder::Model;
use crate::model::linear::{Embedding, Linear, Weight};
use crate::model::reversible::ReversibleConfig;
use crate::model::rope::RopeTables;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// How weights are held in memory.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    #[default]
    F32,
    Bf16,
    F16,
    /// Matrices stay block-quantized (GGUF's own types; Q8_0 for dense sources). Inference only.
    Quantized,
}

impl WeightFormat {
    /// dtype of dense tensors (norms and biases stay f32 under `Quantized`).
    pub fn dense_dtype(self) -> DType {
        match self {
            Self::F32 | Self::Quantized => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// Where tensors come from, by Hugging Face name.
pub trait WeightSource {
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    fn load(&self, name: &str, format: WeightFormat, device: &Device) -> Result<Weight>;
    /// Loads `name` knowing its expected shape (sources that generate weights need it).
    fn load_shaped(
        &self,
        name: &str,
        _shape: &[usize],
        format: WeightFormat,
        device: &Device,
    ) -> Result<Weight> {
        self.load(name, format, device)
    }
}

/// Loads `name` and checks its shape; the error names the file and tensor.
fn load_checked(
    src: &dyn WeightSource,
    name: &str,
    shape: &[usize],
    format: WeightFormat,
    device: &Device,
) -> Result<Weight> {
    let w = src.load_shaped(name, shape, format, device)?;
    if w.shape() != shape {
        bail!(
            "{}: tensor `{name}` has shape {:?}, expected {:?}",
            src.path().display(),
            w.shape(),
            shape
        );
    }
    Ok(w)
}

/// Norms and biases: always dense f32 (they are tiny and precision-sensitive).
fn load_vector(src: &dyn WeightSource, name: &str, len: usize, device: &Device) -> Result<Tensor> {
    Ok(load_checked(src, name, &[len], WeightFormat::F32, device)?.to_dense(DType::F32)?)
}

/// Builds the decoder from any weight source.
pub fn build_model(
    config: &ModelConfig,
    reversible: ReversibleConfig,
    src: &dyn WeightSource,
    format: WeightFormat,
    device: &Device,
) -> Result<Model> {
    reversible.validate(config.num_hidden_layers)?;
    let (d, hd) = (config.hidden_size, config.head_dim());
    let (q_dim, kv_dim) = (config.num_attention_heads * hd, config.kv_dim());
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let w = load_checked(src, &format!("{name}.weight"), &[out, inp], format, device)?;
        let b = if bias {
            Some(load_vector(src, &format!("{name}.bias"), out, device)?)
        } else {
            None
        };
        Ok(Linear::new(w, b)?)
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let bias = config.attention_bias;
        let attn = Attention {
            q_proj: linear(&format!("{p}.self_attn.q_proj"), q_dim, d, bias)?,
            k_proj: linear(&format!("{p}.self_attn.k_proj"), kv_dim, d, bias)?,
            v_proj: linear(&format!("{p}.self_attn.v_proj"), kv_dim, d, bias)?,
            o_proj: linear(&format!("{p}.self_attn.o_proj"), d, q_dim, false)?,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: hd,
        };
        let mlp = Mlp {
            gate_proj: linear(
                &format!("{p}.mlp.gate_proj"),
                config.intermediate_size,
                d,
                false,
            )?,
            up_proj: linear(
                &format!("{p}.mlp.up_proj"),
                config.intermediate_size,
                d,
                false,
            )?,
            down_proj: linear(
                &format!("{p}.mlp.down_proj"),
                d,
                config.intermediate_size,
                false,
            )?,
        };
        let norms = (
            load_vector(src, &format!("{p}.input_layernorm.weight"), d, device)?,
            load_vector(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                d,
                device,
            )?,
        );
        layers.push(Block::new(config, attn, mlp, norms));
    }
    let embed = load_checked(
        src,
        "model.embed_tokens.weight",
        &[config.vocab_size, d],
        format,
        device,
    )?;
    let tied = config.tie_word_embeddings || !src.contains("lm_head.weight");
    let lm_head = if tied {
        None
    } else {
        Some(linear("lm_head", config.vocab_size, d, false)?)
    };
    Ok(Model {
        config: config.clone(),
        reversible,
        embed_tokens: Embedding { weight: embed },
        layers,
        norm: load_vector(src, "model.norm.weight", d, device)?,
        lm_head,
        rope: RopeTables::new(
            hd,
            config.rope_theta,
            config.max_position_embeddings,
            device,
        )?,
        compute_dtype: format.dense_dtype(),
        residual_dtype: DType::F32,
        packed: None,
        device: device.clone(),
    })
}

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub chat_template: ChatTemplate,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// What talking to a model needs besides its weights, read without loading a tensor.
pub struct ModelCard {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub chat_template: ChatTemplate,
}

/// The card of a GGUF file or a (rewind, HF or delta) model directory: its hyperparameters,
/// tokenizer and chat template, as [`load`] would read them.
pub fn describe(path: &Path) -> Result<ModelCard> {
    if !path.exists() {
        bail!(
            "model `{}` not found: give a .gguf file or a model directory",
            path.display()
        );
    }
    if delta::is_delta(path) {
        describe(&delta::base_path(path)?)
    } else if path.is_dir() {
        dir_card(path, &safetensors::SafetensorsSource::open(path)?)
    } else {
        gguf_card(path, &gguf::GgufSource::open(path)?)
    }
}

fn gguf_card(path: &Path, src: &gguf::GgufSource) -> Result<ModelCard> {
    let tokenizer = TextTokenizer::from_gguf_metadata(src.metadata())
        .with_context(|| format!("{}: tokenizer", path.display()))?;
    let chat_template = ChatTemplate::from_gguf_metadata(src.metadata(), &tokenizer)?;
    Ok(ModelCard {
        config: src.config().clone(),
        tokenizer,
        chat_template,
    })
}

fn dir_card(dir: &Path, src: &safetensors::SafetensorsSource) -> Result<ModelCard> {
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    let chat_template = ChatTemplate::from_hf_dir(dir, &tokenizer)?;
    Ok(ModelCard {
        config: src.config.clone(),
        tokenizer,
        chat_template,
    })
}

/// Options for [`load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub format: WeightFormat,
    pub device: Device,
    /// Overrides the scheme recorded with the model (a GGUF or HF model records none: euler).
    pub reversible: Option<ReversibleConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            format: WeightFormat::default(),
            device: Device::Cpu,
            reversible: None,
        }
    }
}

/// Loads a GGUF file or a (rewind or HF) model directory.
pub fn load(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    if !path.exists() {
        bail!(
            "model `{}` not found: give a .gguf file or a model directory",
            path.display()
        );
    }
    if delta::is_delta(path) {
        delta::load_delta(path, options)
    } else if path.is_dir() {
        load_dir(path, options)
    } else {
        load_gguf(path, options)
    }
}

fn load_gguf(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let src = gguf::GgufSource::open(path)?;
    let reversible = options.reversible.clone().unwrap_or_default();
    let model = build_model(
        src.config(),
        reversible,
        &src,
        options.format,
        &options.device,
    )?;
    let card = gguf_card(path, &src)?;
    Ok(LoadedModel {
        model,
        tokenizer: card.tokenizer,
        chat_template: card.chat_template,
        source: path.to_path_buf(),
    })
}

fn load_dir(dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let src = safetensors::SafetensorsSource::open(dir)?;
    let recorded = match src
        .raw_config
        .get("rewind")
        .and_then(|r| r.get("reversible"))
    {
        Some(value) => serde_json::from_value(value.clone()).with_context(|| {
            format!(
                "{}: invalid `rewind.reversible` settings",
                dir.join("config.json").display()
            )
        })?,
        None => ReversibleConfig::euler(),
    };
    let reversible = options.reversible.clone().unwrap_or(recorded);
    let model = build_model(
        &src.config,
        reversible,
        &src,
        options.format,
        &options.device,
    )?;
    let card = dir_card(dir, &src)?;
    Ok(LoadedModel {
        model,
        tokenizer: card.tokenizer,
        chat_template: card.chat_template,
        source: dir.to_path_buf(),
    })
}
