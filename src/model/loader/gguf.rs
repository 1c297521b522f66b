//! GGUF files (llama.cpp's format): hyperparameters from the metadata, tensors by their
//! llama.cpp names, mapped to the Hugging Face names the rest of rewind uses.

use crate::model::config::{Architecture, ModelConfig};
use crate::model::linear::Weight;
use crate::model::loader::{WeightFormat, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct GgufSource {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    config: ModelConfig,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file ({e})", path.display()))?;
        let config = config_from_metadata(&content.metadata, &content)
            .with_context(|| format!("{}: reading model hyperparameters", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn read(&self, gguf_name: &str) -> Result<QTensor> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("GGUF reader poisoned"))?;
        self.content
            .tensor(&mut *file, gguf_name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{gguf_name}`: {e}", self.path.display()))
    }
}

fn meta<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .with_context(|| format!("missing metadata key `{key}`"))
}

fn meta_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let value = meta(metadata, key)?;
    // Writers differ in the integer width they use for counts.
    let n = value
        .to_u64()
        .or_else(|_| value.to_u32().map(u64::from))
        .or_else(|_| value.to_i32().map(|v| v.max(0) as u64))?;
    Ok(n as usize)
}

fn meta_f64(metadata: &HashMap<String, Value>, key: &str) -> Option<f64> {
    metadata
        .get(key)
        .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

fn config_from_metadata(
    metadata: &HashMap<String, Value>,
    content: &Content,
) -> Result<ModelConfig> {
    let arch_name = meta(metadata, "general.architecture")?.to_string()?.clone();
    let architecture = Architecture::parse(&arch_name)?;
    let p = |k: &str| format!("{arch_name}.{k}");
    let heads = meta_usize(metadata, &p("attention.head_count"))?;
    let hidden = meta_usize(metadata, &p("embedding_length"))?;
    let vocab = match meta_usize(metadata, &p("vocab_size")) {
        Ok(v) => v,
        Err(_) => meta(metadata, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let config = ModelConfig {
        model_type: architecture,
        hidden_size: hidden,
        intermediate_size: meta_usize(metadata, &p("feed_forward_length"))?,
        num_hidden_layers: meta_usize(metadata, &p("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: meta_usize(metadata, &p("attention.head_count_kv")).unwrap_or(heads),
        head_dim: meta_usize(metadata, &p("attention.key_length")).ok(),
        vocab_size: vocab,
        rms_norm_eps: meta_f64(metadata, &p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(metadata, &p("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: meta_usize(metadata, &p("context_length")).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    config.validate()?;
    Ok(config)
}

/// Maps a Hugging Face tensor name to its llama.cpp name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Row order that undoes llama.cpp's Q/K permutation (made for its interleaved RoPE):
/// GGUF row (head, i, s) holds HF row (head, s, i) for i < head_dim/2, s in {0, 1}.
fn unpermute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                order.push(h * head_dim + 2 * i + s);
            }
        }
    }
    order
}

/// Reorders the rows of a (rows, cols) quantized tensor; block formats quantize along rows,
/// so each row is an independent run of bytes.
fn permute_qtensor_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let data = q.data()?;
    let row_bytes = data.len() / dims[0];
    let mut out = Vec::with_capacity(data.len());
    for &src in order {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, dims)?)
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn load(&self, name: &str, format: WeightFormat, device: &Device) -> Result<Weight> {
        let gname = gguf_name(name).with_context(|| {
            format!("{}: no GGUF name for tensor `{name}`", self.path.display())
        })?;
        if !self.content.tensor_infos.contains_key(&gname) {
            bail!("{}: missing tensor `{gname}` ({name})", self.path.display());
        }
        let mut q = self.read(&gname)?;
        // llama.cpp permutes Q and K of llama models; qwen2 files are stored unpermuted.
        if self.config.model_type == Architecture::Llama {
            let heads = if gname.contains("attn_q.") {
                Some(self.config.num_attention_heads)
            } else if gname.contains("attn_k.") {
                Some(self.config.num_key_value_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                let rows = q.shape().dims()[0];
                let order = unpermute_rows(rows, heads);
                q = if q.shape().rank() == 2 {
                    permute_qtensor_rows(&q, &order)?
                } else {
                    let t = q.dequantize(&Device::Cpu)?;
                    let idx = Tensor::from_vec(
                        order.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                        rows,
                        &Device::Cpu,
                    )?;
                    QTensor::quantize(&t.index_select(&idx, 0)?, GgmlDType::F32)?
                };
            }
        }
        let keep_quantized = format == WeightFormat::Quantized
            && q.shape().rank() == 2
            && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quantized {
            // Kept in the file's own blocks: the CPU decode path repacks Q4_1 and Q8_0 as they
            // are (and requantises other types to 8 bits itself).
            if device.is_cpu() {
                return Ok(Weight::Quantized(Arc::new(q)));
            }
            let data = q.data()?;
            let storage = QStorage::from_data(Cow::Borrowed(&data), device, q.dtype())?;
            return Ok(Weight::Quantized(Arc::new(QTensor::new(
                storage,
                q.shape().clone(),
            )?)));
        }
        let dense = q
            .dequantize(&Device::Cpu)?
            .to_dtype(format.dense_dtype())?
            .to_device(device)?;
        Ok(Weight::Dense(dense))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.0.bogus.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: HF rows reshaped (heads, 2, half) are swapped to (heads, half, 2).
        let (heads, head_dim) = (3, 8);
        let half = head_dim / 2;
        let mut gguf_rows_hold = vec![0; heads * head_dim];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..half {
                    gguf_rows_hold[h * head_dim + i * 2 + s] = h * head_dim + s * half + i;
                }
            }
        }
        let order = unpermute_rows(heads * head_dim, heads);
        let recovered: Vec<usize> = order.iter().map(|&r| gguf_rows_hold[r]).collect();
        assert_eq!(recovered, (0..heads * head_dim).collect::<Vec<_>>());
    }
}
