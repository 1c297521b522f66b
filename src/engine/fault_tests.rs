//! Fault isolation of a running server, with faults injected where no real input reaches
//! ([`super::faults`]): a panic in one model's batched step fails that batch's requests while
//! the other model's stream goes on; a request that waits too long for its model's weights gets
//! 503 while the other streams keep decoding; a dead engine thread turns `/health` to 503.
//!
//! Each test starts the real server (port 0, its own data directory) on a tiny random model
//! with SmolLM2's tokenizer (the base GGUF `rewind pull` fetches) and talks HTTP to it.

use crate::api::RunningServer;
use crate::engine::faults;
use crate::engine::registry::{Lookup, ModelSpec};
use crate::model::loader::WeightFormat;
use crate::settings::{ModelSettings, Settings};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CHATML: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// A tiny random llama (2 layers, d = 64) with SmolLM2's tokenizer, written once per run.
pub(crate) fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        use crate::model::config::ModelConfig;
        use crate::model::loader::{build_model, random::RandomSource, save::save_model};
        use crate::model::reversible::ReversibleConfig;
        use crate::text::chat_template::ChatTemplate;
        use crate::text::tokenizer::TextTokenizer;
        let gguf = crate::provision::resolve(Some(crate::provision::BASE_MODEL))
            .expect("the base model is provisioned (run `rewind pull`)");
        let mut file = std::fs::File::open(gguf).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let tokenizer = TextTokenizer::from_gguf_metadata(&content.metadata).unwrap();
        let template = ChatTemplate::new("chatml", CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let config: ModelConfig = serde_json::from_value(json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": tokenizer.vocab_size(), "max_position_embeddings": 4096,
            "tie_word_embeddings": true
        }))
        .unwrap();
        let source = RandomSource {
            seed: 7,
            separate_head: false,
        };
        let model = build_model(
            &config,
            ReversibleConfig::euler(),
            &source,
            WeightFormat::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tiny");
        save_model(&model, &tokenizer, &template, &dir, candle_core::DType::F32).unwrap();
        (tmp, dir)
    })
    .1
}

pub(crate) struct App {
    pub server: RunningServer,
    pub _data: tempfile::TempDir,
}

impl App {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }
}

/// Starts a server serving the tiny model under each of `ids` and waits until it is healthy.
pub(crate) fn spawn(ids: &[&str], configure: impl FnOnce(&mut Settings)) -> App {
    let data = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.data_dir = data.path().to_path_buf();
    settings.models = ids
        .iter()
        .map(|id| ModelSettings {
            id: Some(id.to_string()),
            source: tiny_model().to_str().unwrap().into(),
            scheme: None,
            format: WeightFormat::F32,
        })
        .collect();
    configure(&mut settings);
    let app = App {
        server: crate::api::start(settings).unwrap(),
        _data: data,
    };
    wait_until(Duration::from_secs(60), "not healthy", || {
        match client().get(app.url("/health")).send() {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    app
}

pub(crate) fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub(crate) fn wait_until<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(report) if started.elapsed() > limit => panic!("{what} after {limit:?}: {report}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub(crate) fn post(app: &App, path: &str, body: &Value) -> (u16, Value) {
    let res = client().post(app.url(path)).json(body).send().unwrap();
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn chat(model: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Keep talking"}],
           "max_tokens": max_tokens, "stream": stream})
}

/// An SSE response read as it arrives.
struct Stream(BufReader<reqwest::blocking::Response>);

impl Stream {
    fn open(app: &App, body: &Value) -> Self {
        let res = client()
            .post(app.url("/v1/chat/completions"))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200);
        Self(BufReader::new(res))
    }

    /// The next `data:` payload (`[DONE]` as a string), None at the end of the stream.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            match line.trim_end().strip_prefix("data: ") {
                Some("[DONE]") => return Some(json!("[DONE]")),
                Some(data) => return Some(serde_json::from_str(data).unwrap()),
                None => continue,
            }
        }
    }

    /// Reads until `n` more chunks with content have come.
    fn content(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            let chunk = self.next().expect("the stream ended");
            assert!(chunk.get("error").is_none(), "{chunk}");
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
            {
                seen += 1;
            }
        }
    }

    /// Reads to the end; returns the error event, which must end the stream.
    fn error(mut self) -> Value {
        let mut error = None;
        while let Some(event) = self.next() {
            assert!(error.is_none(), "an event after the error: {event}");
            assert_ne!(event, json!("[DONE]"), "the stream finished normally");
            if event.get("error").is_some() {
                error = Some(event);
            }
        }
        error.expect("no error event")
    }
}

fn metric(app: &App, name: &str) -> f64 {
    let text = client()
        .get(app.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// A panic in model A's batched step fails A's requests (500 in the envelope; an error event
/// on a stream), frees their slots and KV caches, and leaves model B's stream decoding; once the
/// fault is gone, A serves again.
#[test]
fn a_panic_in_a_step_fails_that_batch_and_the_engine_serves_on() {
    let (a, b) = ("fault-step-a", "fault-step-b");
    let app = spawn(&[a, b], |_| {});
    let mut other = Stream::open(&app, &chat(b, 4000, true));
    other.content(2);

    faults::panic_in_step(a);
    let (status, body) = post(&app, "/v1/chat/completions", &chat(a, 8, false));
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("injected panic"), "{body}");
    let streamed = Stream::open(&app, &chat(a, 8, true)).error();
    assert_eq!(streamed["error"]["type"], "server_error", "{streamed}");
    // Model B's stream went on through both panics, and goes on now.
    other.content(5);

    faults::clear(a);
    let (status, body) = post(&app, "/v1/chat/completions", &chat(a, 4, false));
    assert_eq!(status, 200, "{body}");
    other.content(2);
    drop(other);
    // Every slot is free again: the failed requests' included.
    wait_until(Duration::from_secs(10), "slots still held", || {
        let held = (
            metric(&app, "rewind_running_sequences"),
            metric(&app, "rewind_kv_cache_reserved_bytes"),
            metric(&app, "rewind_kv_cache_bytes"),
        );
        (held == (0.0, 0.0, 0.0))
            .then_some(())
            .ok_or(format!("{held:?}"))
    });
    assert_eq!(
        client().get(app.url("/health")).send().unwrap().status(),
        200
    );
}

/// A request whose model's weights take longer than `limits.model_load_timeout_secs` to load
/// gets 503 with Retry-After (streamed: an error event with the same envelope), while requests
/// for the loaded model are answered meanwhile; the load itself goes on and serves later ones.
#[test]
fn a_request_waiting_too_long_for_its_model_gets_503() {
    let base = "fault-load-base";
    let slow = "ft:fault-load:me::slow";
    let spec = ModelSpec {
        id: slow.into(),
        source: tiny_model().to_str().unwrap().into(),
        scheme: None,
        format: WeightFormat::F32,
        created: 1,
        owned_by: "me".into(),
    };
    let app = spawn(&[base], |s| {
        s.limits.model_load_timeout_secs = 1;
        std::fs::write(
            s.data_dir.join("models.json"),
            serde_json::to_vec(&[&spec]).unwrap(),
        )
        .unwrap();
    });
    // Its card is read at start; only the weights wait for a request.
    wait_until(Duration::from_secs(30), "no card", || {
        match app.server.engine.registry().lookup(slow) {
            Lookup::Ready(_) => Ok(()),
            _ => Err("not ready".to_string()),
        }
    });
    faults::slow_load(slow, Duration::from_secs(4));

    let started = Instant::now();
    let waiting = std::thread::spawn({
        let url = app.url("/v1/chat/completions");
        move || {
            let res = client()
                .post(url)
                .json(&chat(slow, 4, false))
                .send()
                .unwrap();
            let retry_after = res.headers().get("retry-after").cloned();
            (
                res.status().as_u16(),
                retry_after,
                res.json::<Value>().unwrap(),
            )
        }
    });
    // Answered while the other model loads.
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = post(&app, "/v1/chat/completions", &chat(base, 4, false));
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let (status, retry_after, body) = waiting.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some());
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still loading"),
        "{body}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A stream waiting for the same load: its headers went out, so the 503 is its last event.
    let streamed = Stream::open(&app, &chat(slow, 4, true)).error();
    assert_eq!(
        streamed["error"]["code"], "service_unavailable",
        "{streamed}"
    );

    // The load went on: once done, the model answers.
    faults::clear(slow);
    wait_until(
        Duration::from_secs(10),
        "the load did not finish",
        || match post(&app, "/v1/chat/completions", &chat(slow, 4, false)) {
            (200, _) => Ok(()),
            (status, body) => Err(format!("{status} {body}")),
        },
    );
    assert_eq!(metric(&app, "rewind_model_loads_total"), 2.0);
}

/// An engine thread that died (a panic outside the regions that catch one) turns `/health` to
/// 503 in the error envelope, and requests to 503.
#[test]
fn health_reports_a_dead_engine_thread() {
    let model = "fault-dead-engine";
    let app = spawn(&[model], |_| {});
    assert!(app.server.engine.is_alive());
    app.server.engine.kill_for_test();
    wait_until(Duration::from_secs(10), "still alive", || {
        (!app.server.engine.is_alive())
            .then_some(())
            .ok_or(String::new())
    });
    let res = client().get(app.url("/health")).send().unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some());
    let body: Value = res.json().unwrap();
    assert_eq!(body["status"], "engine_stopped", "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    let (status, body) = post(&app, "/v1/chat/completions", &chat(model, 2, false));
    assert_eq!(status, 503, "{body}");
}
