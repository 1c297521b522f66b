//! Typed server configuration: `config.toml`, then `REWIND_*` environment variables, then
//! command-line flags, each layer overriding the one before. One sub-struct per subsystem; every
//! field has a default, so an empty (or absent) file is a working configuration that serves the
//! default model on 127.0.0.1:8000.

use crate::model::loader::WeightFormat;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the server keeps its state (the fine-tuned model registry, uploaded files, jobs).
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub limits: Limits,
    /// The models to serve; empty means the default model.
    pub models: Vec<ModelSettings>,
    pub fine_tuning: FineTuningSettings,
}

/// The fine-tuning service (`/v1/files`, `/v1/fine_tuning/jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FineTuningSettings {
    /// Uploads larger than this get 413 (an upload is streamed to disk as it arrives, so this
    /// bounds disk use, not memory).
    pub max_file_bytes: usize,
    /// Training examples longer than this many tokens are truncated (a warning event says how
    /// many were).
    pub max_seq_len: usize,
    /// A `metrics` event is recorded every this many optimizer steps (and on the last one).
    pub metrics_every: usize,
    /// Upper bounds on a job's hyperparameters, checked when the job is created (400 naming the
    /// parameter): `n_epochs`, `batch_size`, `learning_rate_multiplier` and `rewind.lora_rank`.
    pub max_n_epochs: usize,
    pub max_batch_size: usize,
    pub max_learning_rate_multiplier: f64,
    pub max_lora_rank: usize,
    /// Times a job's trainer may start without ending cleanly (the server stopped or crashed
    /// while it trained) before the job is failed instead of resumed again.
    pub max_job_attempts: usize,
}

impl Default for FineTuningSettings {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 << 20,
            max_seq_len: 512,
            metrics_every: 1,
            max_n_epochs: 50,
            max_batch_size: 256,
            max_learning_rate_multiplier: 1000.0,
            // Rank 256 on every projection of a 0.5B model is ~0.3 GB of adapters and their
            // optimizer state; larger ranks than the smallest width make no sense anyway.
            max_lora_rank: 256,
            max_job_attempts: 3,
        }
    }
}

/// Network and security.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    /// 0 picks a free port (the bound address is logged).
    pub port: u16,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Accepted `Authorization: Bearer` keys; empty disables authentication.
    pub api_keys: Vec<String>,
    /// Origins allowed to call the API from a browser; empty disables CORS, `["*"]` allows any.
    pub cors_origins: Vec<String>,
    /// `/metrics` answers without a key (for a Prometheus scraper inside a trusted network);
    /// otherwise it needs one like every other route but `/health`.
    pub public_metrics: bool,
    /// Where the engine runs the models: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// Admission and resource limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Requests waiting for a batch slot beyond which new ones get 429 (every request waits
    /// briefly, so at least 1).
    pub max_queue: usize,
    /// Sequences decoded together in one step (every choice of `n` is a sequence).
    pub max_batch: usize,
    /// Memory for the KV caches of running sequences, in MiB. A request is admitted only when
    /// the worst case of its caches fits.
    pub kv_cache_mb: usize,
    /// Prompt tokens prefilled in one step; bounds the stall new requests cause running streams:
    /// new requests are admitted while their prompts fit, and a longer prompt is fed over
    /// several steps while the others keep decoding.
    pub max_prefill_tokens: usize,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// Seconds a request body may stall (no byte arriving) before the request gets 408.
    pub body_timeout_secs: u64,
    /// Upper bound on `max_tokens` / `max_completion_tokens`.
    pub max_tokens: usize,
    /// Upper bound on `n`.
    pub max_n: usize,
    /// Messages in one chat request.
    pub max_messages: usize,
    /// Tools offered in one request.
    pub max_tools: usize,
    /// Entries of `logit_bias`.
    pub max_logit_bias: usize,
    /// Characters of each `stop` sequence.
    pub max_stop_chars: usize,
    /// Bytes of one JSON schema (`response_format`, each tool's `parameters`), serialised.
    pub max_schema_bytes: usize,
    /// Nesting of one JSON schema, counted in schemas within schemas (`$ref`s followed).
    pub max_schema_depth: usize,
    /// Fine-tuned models (and checkpoints) whose weights stay in memory at once; the others
    /// load on their next request, replacing the least recently used idle one. Configured
    /// models always stay loaded.
    pub max_loaded_fine_tuned_models: usize,
    /// Seconds a request waits for its model's weights to load before it gets 503 with
    /// `Retry-After` (the load goes on; a later request finds the model loaded).
    pub model_load_timeout_secs: usize,
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The name clients send as `model`; defaults to the source's name.
    #[serde(default)]
    pub id: Option<String>,
    /// A known model name (fetched if absent), a `.gguf` file or a model directory.
    pub source: String,
    /// Run with this reversible coupling scheme instead of the model's own, e.g. `midpoint`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// How weights are held in memory: quantized (default), f32, bf16 or f16.
    #[serde(default = "default_format")]
    pub format: WeightFormat,
}

/// quantized: the GGUF's own blocks through the CPU decode kernels, 3x the f32 decode speed, at
/// a held-out KL of 0.004 nats/token against f32 (`rewind eval --format quantized
/// --reference-format f32`, docs/benchmarks.md).
fn default_format() -> WeightFormat {
    WeightFormat::Quantized
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            server: ServerSettings::default(),
            limits: Limits::default(),
            models: Vec::new(),
            fine_tuning: FineTuningSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            workers: 0,
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            public_metrics: false,
            device: "cpu".into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queue: 256,
            max_batch: 32,
            kv_cache_mb: 4096,
            max_prefill_tokens: 512,
            max_body_bytes: 4 << 20,
            body_timeout_secs: 60,
            max_tokens: 8192,
            max_n: 16,
            // OpenAI's own limits for the next three.
            max_messages: 2048,
            max_tools: 128,
            max_logit_bias: 300,
            max_stop_chars: 256,
            max_schema_bytes: 64 << 10,
            max_schema_depth: 32,
            max_loaded_fine_tuned_models: 2,
            model_load_timeout_secs: 120,
        }
    }
}

impl ModelSettings {
    pub fn new(source: &str) -> Self {
        Self {
            id: None,
            source: source.to_string(),
            scheme: None,
            format: default_format(),
        }
    }

    /// The id clients use: the configured one, else the known model's canonical name, else the
    /// file or directory name without extension.
    pub fn served_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        if self.source.eq_ignore_ascii_case("default") {
            return crate::provision::DEFAULT_MODEL.to_string();
        }
        if let Some(known) = crate::provision::find_known(&self.source) {
            return known.name.to_string();
        }
        let path = Path::new(&self.source);
        let stem = if path.extension().is_some_and(|e| e == "gguf") {
            path.file_stem()
        } else {
            path.file_name()
        };
        stem.and_then(|s| s.to_str())
            .unwrap_or(&self.source)
            .to_string()
    }
}

/// Command-line overrides (the highest layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub model: Option<String>,
    pub format: Option<WeightFormat>,
    pub scheme: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl Settings {
    /// Reads `path` (when given; a missing file is an error), applies the environment and the
    /// overrides, and checks the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let mut settings = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        settings.apply_env(|name| std::env::var(name).ok())?;
        settings.apply_overrides(overrides);
        settings.validate()?;
        Ok(settings)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("{}: invalid configuration", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// `REWIND_*` variables; `get` looks one up (the environment, or a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T>
        where
            T::Err: std::fmt::Display,
        {
            value
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{name}={value:?}: {e}"))
        }
        fn list(value: &str) -> Vec<String> {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        }
        if let Some(v) = get("REWIND_HOST") {
            self.server.host = v;
        }
        if let Some(v) = get("REWIND_PORT") {
            self.server.port = parse("REWIND_PORT", &v)?;
        }
        if let Some(v) = get("REWIND_WORKERS") {
            self.server.workers = parse("REWIND_WORKERS", &v)?;
        }
        if let Some(v) = get("REWIND_API_KEYS") {
            self.server.api_keys = list(&v);
        }
        if let Some(v) = get("REWIND_CORS_ORIGINS") {
            self.server.cors_origins = list(&v);
        }
        if let Some(v) = get("REWIND_BODY_TIMEOUT_SECS") {
            self.limits.body_timeout_secs = parse("REWIND_BODY_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = get("REWIND_PUBLIC_METRICS") {
            self.server.public_metrics = parse("REWIND_PUBLIC_METRICS", &v)?;
        }
        if let Some(v) = get("REWIND_DEVICE") {
            self.server.device = v;
        }
        if let Some(v) = get("REWIND_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        let limits = [
            ("REWIND_MAX_QUEUE", &mut self.limits.max_queue),
            ("REWIND_MAX_BATCH", &mut self.limits.max_batch),
            ("REWIND_KV_CACHE_MB", &mut self.limits.kv_cache_mb),
            (
                "REWIND_MAX_PREFILL_TOKENS",
                &mut self.limits.max_prefill_tokens,
            ),
            ("REWIND_MAX_BODY_BYTES", &mut self.limits.max_body_bytes),
            ("REWIND_MAX_TOKENS", &mut self.limits.max_tokens),
            ("REWIND_MAX_N", &mut self.limits.max_n),
            ("REWIND_MAX_MESSAGES", &mut self.limits.max_messages),
            ("REWIND_MAX_TOOLS", &mut self.limits.max_tools),
            ("REWIND_MAX_LOGIT_BIAS", &mut self.limits.max_logit_bias),
            ("REWIND_MAX_STOP_CHARS", &mut self.limits.max_stop_chars),
            ("REWIND_MAX_SCHEMA_BYTES", &mut self.limits.max_schema_bytes),
            ("REWIND_MAX_SCHEMA_DEPTH", &mut self.limits.max_schema_depth),
            (
                "REWIND_MAX_LOADED_FINE_TUNED_MODELS",
                &mut self.limits.max_loaded_fine_tuned_models,
            ),
            (
                "REWIND_MODEL_LOAD_TIMEOUT_SECS",
                &mut self.limits.model_load_timeout_secs,
            ),
        ];
        for (name, field) in limits {
            if let Some(v) = get(name) {
                *field = parse(name, &v)?;
            }
        }
        if let Some(v) = get("REWIND_MODEL") {
            self.models = vec![ModelSettings::new(&v)];
        }
        if let Some(v) = get("REWIND_FORMAT") {
            let format = serde_json::from_value::<WeightFormat>(serde_json::Value::String(
                v.to_ascii_lowercase(),
            ))
            .map_err(|_| {
                anyhow::anyhow!("REWIND_FORMAT={v:?}: expected f32, bf16, f16 or quantized")
            })?;
            self.models_or_default()
                .iter_mut()
                .for_each(|m| m.format = format);
        }
        Ok(())
    }

    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(host) = &o.host {
            self.server.host = host.clone();
        }
        if let Some(port) = o.port {
            self.server.port = port;
        }
        if let Some(dir) = &o.data_dir {
            self.data_dir = dir.clone();
        }
        if let Some(model) = &o.model {
            self.models = vec![ModelSettings::new(model)];
        }
        if let Some(format) = o.format {
            self.models_or_default()
                .iter_mut()
                .for_each(|m| m.format = format);
        }
        if let Some(scheme) = &o.scheme {
            self.models_or_default()
                .iter_mut()
                .for_each(|m| m.scheme = Some(scheme.clone()));
        }
    }

    /// The configured models, materialising the default one so that per-model overrides apply.
    fn models_or_default(&mut self) -> &mut Vec<ModelSettings> {
        if self.models.is_empty() {
            self.models
                .push(ModelSettings::new(crate::provision::DEFAULT_MODEL));
        }
        &mut self.models
    }

    /// The models to serve (the default model when none is configured).
    pub fn served_models(&self) -> Vec<ModelSettings> {
        if self.models.is_empty() {
            vec![ModelSettings::new(crate::provision::DEFAULT_MODEL)]
        } else {
            self.models.clone()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let l = &self.limits;
        for (name, value) in [
            ("limits.max_queue", l.max_queue),
            ("limits.max_batch", l.max_batch),
            ("limits.kv_cache_mb", l.kv_cache_mb),
            ("limits.max_prefill_tokens", l.max_prefill_tokens),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_tokens", l.max_tokens),
            ("limits.max_n", l.max_n),
            (
                "limits.max_loaded_fine_tuned_models",
                l.max_loaded_fine_tuned_models,
            ),
            ("limits.max_messages", l.max_messages),
            ("limits.max_schema_bytes", l.max_schema_bytes),
            ("limits.max_schema_depth", l.max_schema_depth),
            ("fine_tuning.max_n_epochs", self.fine_tuning.max_n_epochs),
            (
                "fine_tuning.max_batch_size",
                self.fine_tuning.max_batch_size,
            ),
            ("limits.model_load_timeout_secs", l.model_load_timeout_secs),
            (
                "fine_tuning.max_job_attempts",
                self.fine_tuning.max_job_attempts,
            ),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        let mut ids: Vec<String> = self
            .served_models()
            .iter()
            .map(ModelSettings::served_id)
            .collect();
        ids.sort();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "two models are served as `{}`: give them distinct `id`s",
                w[0]
            );
        }
        if let Some(id) = ids.iter().find(|id| id.starts_with("ft:")) {
            bail!("model id `{id}`: the `ft:` prefix is reserved for fine-tuned models");
        }
        if self.server.api_keys.iter().any(|k| k.is_empty()) {
            bail!("server.api_keys contains an empty key");
        }
        if l.body_timeout_secs == 0 {
            bail!("limits.body_timeout_secs must be at least 1");
        }
        let lr = self.fine_tuning.max_learning_rate_multiplier;
        if !(lr.is_finite() && lr > 0.0) {
            bail!("fine_tuning.max_learning_rate_multiplier must be a positive number");
        }
        parse_device(&self.server.device)?;
        Ok(())
    }

    pub fn kv_cache_bytes(&self) -> usize {
        self.limits.kv_cache_mb.saturating_mul(1 << 20)
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<DeviceSpec> {
    match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => bail!("device `{name}`: expected cpu, cuda or cuda:N"),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn open(self) -> Result<candle_core::Device> {
        Ok(match self {
            Self::Cpu => candle_core::Device::Cpu,
            Self::Cuda(n) => candle_core::Device::new_cuda(n)
                .context("opening the CUDA device (is this a `--features cuda` build?)")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn empty_file_is_the_default() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(
            s.served_models()[0].served_id(),
            crate::provision::DEFAULT_MODEL
        );
        s.validate().unwrap();
    }

    #[test]
    fn shipped_config_parses() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
                .unwrap();
        let s = Settings::from_toml(&text).unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn file_then_env_then_flags() {
        let mut s = Settings::from_toml(
            r#"
            data_dir = "/srv/rewind"
            [server]
            port = 9000
            api_keys = ["a"]
            [limits]
            max_batch = 8
            [[models]]
            source = "models/x.gguf"
            format = "f32"
            "#,
        )
        .unwrap();
        assert_eq!(s.models[0].served_id(), "x");
        let env: HashMap<&str, &str> = [
            ("REWIND_PORT", "9100"),
            ("REWIND_API_KEYS", "k1, k2"),
            ("REWIND_MAX_BATCH", "4"),
            ("REWIND_MODEL_LOAD_TIMEOUT_SECS", "30"),
            ("REWIND_FORMAT", "Quantized"),
        ]
        .into();
        s.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!((s.server.port, s.limits.max_batch), (9100, 4));
        assert_eq!(s.limits.model_load_timeout_secs, 30);
        assert_eq!(s.server.api_keys, ["k1", "k2"]);
        assert_eq!(s.models[0].format, WeightFormat::Quantized);
        s.apply_overrides(&Overrides {
            port: Some(1),
            model: Some("smollm2".into()),
            ..Default::default()
        });
        assert_eq!(s.server.port, 1);
        assert_eq!(
            s.served_models()[0].served_id(),
            crate::provision::BASE_MODEL
        );
        assert_eq!(s.data_dir, PathBuf::from("/srv/rewind"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = Settings::from_toml("[server]\nprot = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        let mut s = Settings::default();
        let err = s
            .apply_env(|k| (k == "REWIND_PORT").then(|| "http".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("REWIND_PORT"), "{err}");
        let mut s = Settings::default();
        s.limits.max_batch = 0;
        assert!(s.validate().unwrap_err().to_string().contains("max_batch"));
        let s = Settings {
            models: vec![
                ModelSettings::new("a.gguf"),
                ModelSettings::new("dir/a.gguf"),
            ],
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("distinct"));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_device("cuda:1").unwrap(), DeviceSpec::Cuda(1));
    }
}
