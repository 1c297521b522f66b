//! Helpers shared by the integration tests.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    use rewind::model::config::ModelConfig;
    use rewind::model::loader::{
        build_model, random::RandomSource, save::save_model, WeightFormat,
    };
    use rewind::model::reversible::ReversibleConfig;
    use rewind::text::chat_template::ChatTemplate;
    use rewind::text::tokenizer::TextTokenizer;
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

// ---------------------------------------------------------------------------------------------
// Servers on the tiny model.

/// The id the tiny model is served under.
pub const TINY: &str = "tiny";

/// A plain ChatML template.
pub const CHATML: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// The tiny model (see `write_tiny_model`) with the ChatML template, written once per test
/// binary.
pub fn tiny_chatml_model() -> &'static Path {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &DIR.get_or_init(|| write_tiny_model("chatml", CHATML)).1
}

/// The HTTP client of the server tests (120 s a request).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A free port on localhost (bound, read and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Uploads `content` as `facts.jsonl` for fine-tuning to the server at `base`
/// (`http://host:port`); the upload must succeed. Returns the file object.
pub fn upload_training_file(base: &str, content: Vec<u8>) -> Value {
    let form = reqwest::blocking::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::blocking::multipart::Part::bytes(content).file_name("facts.jsonl"),
        );
    let res = client()
        .post(format!("{base}/v1/files"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().unwrap()
}

/// `rewind serve` as a child process, so that it can be signalled, killed with SIGKILL, and
/// started again on the same data directory (once it has exited: it holds the directory's lock).
/// It serves one model as [`TINY`]; its config is written to `<data>/config.toml` and its output
/// appended to `<data>/server.log`. Dropping it kills it (SIGKILL) and reaps it.
pub struct ServeProcess {
    child: std::process::Child,
    data: PathBuf,
    base: String,
}

impl ServeProcess {
    /// Starts `rewind serve` on `data` serving `model`, with `extra_config` (TOML: top-level keys
    /// or whole tables) added to its config, and waits until it is healthy.
    pub fn start(data: &Path, model: &Path, extra_config: &str) -> Self {
        Self::spawn(data, model, extra_config, &[]).healthy()
    }

    /// Starts `rewind serve` as `start` does, with `env` set in its environment, without waiting
    /// for it.
    pub fn spawn(data: &Path, model: &Path, extra_config: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let config = data.join("config.toml");
        let text = format!(
            "data_dir = {:?}\n{extra_config}\n[server]\nworkers = 2\nport = {port}\n\
             [[models]]\nid = \"{TINY}\"\nsource = {:?}\n",
            data.to_str().unwrap(),
            model.to_str().unwrap()
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("server.log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rewind"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            data: data.to_path_buf(),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until `/health` answers 200, failing at once (with the log) if the process exits.
    pub fn healthy(mut self) -> Self {
        wait_until(Duration::from_secs(60), "the server did not start", || {
            if let Some(status) = self.try_wait() {
                panic!("the server exited ({status}):\n{}", self.log());
            }
            match client().get(self.url("/health")).send() {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        self
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path`, read as JSON.
    pub fn get(&self, path: &str) -> Value {
        client().get(self.url(path)).send().unwrap().json().unwrap()
    }

    /// POST `body` to `path`: the status and the JSON answer (null if it is none).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = client().post(self.url(path)).json(body).send().unwrap();
        (res.status().as_u16(), res.json().unwrap_or(Value::Null))
    }

    /// See [`upload_training_file`].
    pub fn upload(&self, content: Vec<u8>) -> Value {
        upload_training_file(&self.base, content)
    }

    /// Polls fine-tuning job `id` until it succeeded, failed or was cancelled (120 s at most).
    pub fn finished_job(&self, id: &str) -> Value {
        wait_until(Duration::from_secs(120), "job not finished", || {
            let job = self.get(&format!("/v1/fine_tuning/jobs/{id}"));
            match job["status"].as_str().unwrap() {
                "succeeded" | "failed" | "cancelled" => Ok(job),
                _ => Err(job.to_string()),
            }
        })
    }

    /// What the server has written to `<data>/server.log` so far (by every start on `data`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `limit` for the process to exit (killing it and failing past that); returns
    /// its status and how long it took.
    pub fn exits_within(mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The training loss of each step among a fine-tuning job's `metrics` events, asserting that a
/// step trained more than once (again after a kill) reproduced its loss.
pub fn step_losses(events: &[Value]) -> std::collections::HashMap<u64, f64> {
    let mut losses = std::collections::HashMap::new();
    for e in events.iter().filter(|e| e["type"] == "metrics") {
        if let (Some(step), Some(loss)) =
            (e["data"]["step"].as_u64(), e["data"]["train_loss"].as_f64())
        {
            if let Some(previous) = losses.insert(step, loss) {
                assert!(
                    (previous - loss).abs() < 1e-4 * previous.abs().max(1.0),
                    "step {step}: {previous} then {loss}"
                );
            }
        }
    }
    losses
}
