//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model (the converted SmolLM2 delta), provisioned by `.ci/run` (`rewind pull`).
pub fn default_model() -> PathBuf {
    rewind::provision::resolve(None).expect("the default model is provisioned (run `rewind pull`)")
}

/// The original SmolLM2-135M-Instruct GGUF the default model is converted from.
pub fn base_model() -> PathBuf {
    rewind::provision::resolve(Some(rewind::provision::BASE_MODEL))
        .expect("the base model is provisioned (run `rewind pull`)")
}

/// max |a - b| over all elements, in f64.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    (a.to_dtype(candle_core::DType::F64).unwrap() - b.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The device the numeric tests (gradients, training, invertibility) run on: the first GPU when
/// `REWIND_TEST_DEVICE=cuda` (in a `--features cuda` build), else the CPU.
pub fn device() -> candle_core::Device {
    match std::env::var("REWIND_TEST_DEVICE").as_deref() {
        Ok("cuda") => candle_core::Device::new_cuda(0).expect("a CUDA device"),
        Ok("cpu") | Err(_) => candle_core::Device::Cpu,
        Ok(other) => panic!("REWIND_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests").join("fixtures").join(name)
}

/// Writes a tiny random llama (2 layers, d=64) with the default model's real tokenizer and the
/// given chat template, for plumbing tests; returns the temporary folder and the model directory.
pub fn write_tiny_model(template_name: &str, template: &str) -> (tempfile::TempDir, PathBuf) {
    use rewind::model::chat_template::ChatTemplate;
    use rewind::model::config::ModelConfig;
    use rewind::model::loader::{
        build_model, random::RandomSource, save::save_model, WeightFormat,
    };
    use rewind::model::reversible::ReversibleConfig;
    use rewind::model::tokenizer::TextTokenizer;
    let mut file = std::fs::File::open(base_model()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tokenizer = TextTokenizer::from_gguf_metadata(&content.metadata).unwrap();
    let template =
        ChatTemplate::new(template_name, template, "<|im_start|>", "<|im_end|>").unwrap();
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tokenizer.vocab_size(),
        "max_position_embeddings": 4096, "tie_word_embeddings": true
    }))
    .unwrap();
    let src = RandomSource {
        seed: 7,
        separate_head: false,
    };
    let model = build_model(
        &config,
        ReversibleConfig::euler(),
        &src,
        WeightFormat::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    save_model(&model, &tokenizer, &template, &dir, candle_core::DType::F32).unwrap();
    (tmp, dir)
}

/// Calls `probe` every 20 ms until it returns a value, failing with `what` (and the last probe's
/// report) once `limit` has passed.
pub fn wait_until<T>(
    limit: std::time::Duration,
    what: &str,
    probe: impl FnMut() -> Result<T, String>,
) -> T {
    poll_until(limit, std::time::Duration::from_millis(20), what, probe)
}

/// `wait_until`, probing every `every`.
pub fn poll_until<T>(
    limit: std::time::Duration,
    every: std::time::Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(report) if started.elapsed() > limit => {
                panic!("{what} after {limit:?}: {report}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}
