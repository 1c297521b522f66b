//! Black-box tests of the OpenAI-compatible server: each starts the real server on port 0 with
//! a temporary data directory and talks HTTP to it.
//!
//! Plumbing runs on a tiny random model (2 layers, d = 64, SmolLM2's tokenizer) written to a
//! model directory at test time; end-to-end checks run on the real default model.

mod common;

use common::{client, wait_until};
use rewind::api::RunningServer;
use rewind::engine::registry::ModelSpec;
use rewind::model::loader::WeightFormat;
use rewind::settings::{ModelSettings, Settings};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TINY: &str = "tiny";
const SMOL: &str = "smollm2-135m-instruct-rewind";

/// A ChatML template that renders `tools` (Hermes style), so the tools path can be exercised.
const TOOLS_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// The tiny model's directory, written once per test run.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| common::write_tiny_model("tools test template", TOOLS_TEMPLATE))
        .1
}

struct App {
    server: RunningServer,
    _data: tempfile::TempDir,
}

impl App {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }
}

/// Starts a server on port 0 with a temporary data directory and waits until it is healthy.
fn spawn_app(models: &[(&str, &str, WeightFormat)], configure: impl FnOnce(&mut Settings)) -> App {
    let data = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.data_dir = data.path().to_path_buf();
    settings.models = models
        .iter()
        .map(|(id, source, format)| ModelSettings {
            id: Some(id.to_string()),
            source: source.to_string(),
            scheme: None,
            format: *format,
        })
        .collect();
    configure(&mut settings);
    let server = rewind::api::start(settings).unwrap();
    let app = App {
        server,
        _data: data,
    };
    wait_until(Duration::from_secs(60), "the model did not load", || {
        let health = client().get(app.url("/health")).send().unwrap();
        match health.status().as_u16() {
            200 => Ok(()),
            503 => Err("503".into()),
            status => panic!("health before loading: {status}"),
        }
    });
    app
}

/// The shared tiny-model server for tests that need no special limits.
fn tiny() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        spawn_app(
            &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
            |s| {
                s.limits.max_body_bytes = 1 << 20;
                s.server.cors_origins = vec!["https://app.example".into()];
            },
        )
    })
}

/// The shared server of the real default model (the converted SmolLM2). f32 weights: see the
/// report on the quantized path.
fn smol() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let path = common::default_model();
        spawn_app(&[(SMOL, path.to_str().unwrap(), WeightFormat::F32)], |_| {})
    })
}

fn post(app: &App, path: &str, body: &Value) -> (u16, Value) {
    let res = client().post(app.url(path)).json(body).send().unwrap();
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

fn chat(app: &App, body: Value) -> Value {
    let (status, value) = post(app, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{value}");
    value
}

/// One SSE stream, read to the end: the JSON payloads, and whether it ended with `[DONE]`.
fn sse(app: &App, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let res = client().post(app.url(path)).json(body).send().unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    parse_sse(&res.text().unwrap())
}

fn parse_sse(text: &str) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        if block.starts_with(':') {
            continue;
        }
        let data = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data event: {block:?}"));
        assert!(!done, "an event after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

/// Concatenated content per choice from chat chunks.
fn chat_stream_text(chunks: &[Value], choices: usize) -> Vec<String> {
    let mut text = vec![String::new(); choices];
    for c in chunks {
        for choice in c["choices"].as_array().unwrap() {
            if let Some(s) = choice["delta"]["content"].as_str() {
                text[choice["index"].as_u64().unwrap() as usize].push_str(s);
            }
        }
    }
    text
}

fn error_of(value: &Value) -> (&str, Option<&str>, Option<&str>) {
    let e = &value["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{value}"
    );
    (
        e["type"].as_str().unwrap(),
        e["param"].as_str(),
        e["code"].as_str(),
    )
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

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[test]
fn models_are_listed_and_retrieved() {
    let app = tiny();
    let list: Value = client()
        .get(app.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["object"], "list");
    let model = &list["data"][0];
    assert_eq!(
        (model["id"].as_str(), model["object"].as_str()),
        (Some(TINY), Some("model"))
    );
    assert!(model["created"].as_u64().is_some() && model["owned_by"].as_str().is_some());
    let one: Value = client()
        .get(app.url("/v1/models/tiny"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(one["id"], TINY);

    let res = client().get(app.url("/v1/models/gpt-5")).send().unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().unwrap();
    assert_eq!(error_of(&body).2, Some("model_not_found"));
    // Base models cannot be deleted; unknown ones are not found.
    assert_eq!(
        client()
            .delete(app.url("/v1/models/tiny"))
            .send()
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        client()
            .delete(app.url("/v1/models/ft:tiny:x::y"))
            .send()
            .unwrap()
            .status(),
        404
    );
    // Unknown paths get the envelope too.
    let res = client().get(app.url("/v1/nothing")).send().unwrap();
    assert_eq!(res.status(), 404);
    error_of(&res.json().unwrap());
}

/// Fine-tuned models beyond `limits.max_loaded_fine_tuned_models` are served all the same:
/// their weights load on demand, the least recently used idle one gives way, and a model
/// loaded again answers as it did before. One whose weights have gone fails clearly, first
/// from the load and then at once.
#[test]
fn fine_tuned_models_beyond_the_limit_load_on_demand() {
    let source = tiny_model().to_str().unwrap();
    let broken = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(source).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, broken.path().join(file.file_name().unwrap())).unwrap();
    }
    let fine_tuned = |id: &str, source: &Path, scheme: Option<&str>| ModelSpec {
        id: id.into(),
        source: source.to_str().unwrap().into(),
        scheme: scheme.map(str::to_string),
        format: WeightFormat::F32,
        created: 1,
        owned_by: "me".into(),
    };
    let (a, b, c) = ("ft:tiny:me::a", "ft:tiny:me::b", "ft:tiny:me::c");
    let specs = [
        fine_tuned(a, tiny_model(), None),
        fine_tuned(b, tiny_model(), Some("midpoint")),
        fine_tuned(c, broken.path(), None),
    ];
    let app = spawn_app(&[(TINY, source, WeightFormat::F32)], |s| {
        s.limits.max_loaded_fine_tuned_models = 1;
        // Recorded by an earlier run: served again, weights not loaded until asked for.
        std::fs::write(
            s.data_dir.join("models.json"),
            serde_json::to_vec(&specs).unwrap(),
        )
        .unwrap();
    });
    let counts = || {
        (
            metric(&app, "rewind_model_loads_total"),
            metric(&app, "rewind_loaded_models"),
        )
    };
    let ask = |model: &str| {
        let body =
            json!({"model": model, "messages": user("Hello"), "max_tokens": 8, "temperature": 0});
        // 503 while the model's card (tokenizer, template) is still being read.
        let reply = wait_until(Duration::from_secs(30), "still loading", || {
            match post(&app, "/v1/chat/completions", &body) {
                (503, value) => Err(value.to_string()),
                (status, value) => {
                    assert_eq!(status, 200, "{value}");
                    Ok(value)
                }
            }
        });
        reply["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(counts(), (1.0, 1.0), "only the configured model at start");
    let first = ask(a);
    assert_eq!(counts(), (2.0, 2.0));
    ask(a);
    assert_eq!(counts(), (2.0, 2.0), "a loaded model is not loaded again");
    ask(b);
    assert_eq!(counts(), (3.0, 2.0), "b replaces a");
    ask(TINY);
    assert_eq!(counts(), (3.0, 2.0), "the configured model stays");
    assert_eq!(ask(a), first);
    assert_eq!(counts(), (4.0, 2.0));

    ask(c);
    for weights in std::fs::read_dir(broken.path()).unwrap() {
        let weights = weights.unwrap().path();
        if weights.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(weights).unwrap();
        }
    }
    ask(a);
    let body = json!({"model": c, "messages": user("Hello"), "max_tokens": 2});
    let (status, failed) = post(&app, "/v1/chat/completions", &body);
    assert_eq!(status, 500, "{failed}");
    let (status, again) = post(&app, "/v1/chat/completions", &body);
    assert_eq!(status, 503, "{again}");
    let message = again["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed to load"), "{again}");
    ask(a);
}

/// Loading a model's weights does not stall the streams in flight: while a stored fine-tuned
/// model (the real 135M default model, about a second to load) loads for its first request, a
/// stream on the tiny configured model keeps producing tokens.
#[test]
fn streams_keep_decoding_while_a_model_loads() {
    let slow = "ft:smollm2:me::loads";
    let spec = ModelSpec {
        id: slow.into(),
        source: common::default_model().to_str().unwrap().into(),
        scheme: None,
        format: WeightFormat::F32,
        created: 1,
        owned_by: "me".into(),
    };
    let app = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| {
            std::fs::write(
                s.data_dir.join("models.json"),
                serde_json::to_vec(&[&spec]).unwrap(),
            )
            .unwrap();
        },
    );
    // Its card (tokenizer, template) is read at start; its weights wait for a request.
    wait_until(Duration::from_secs(60), "no card", || {
        match app.server.engine.registry().lookup(slow) {
            rewind::engine::registry::Lookup::Ready(_) => Ok(()),
            _ => Err("not ready".to_string()),
        }
    });
    let loads = metric(&app, "rewind_model_loads_total");
    let stream = client()
        .post(app.url("/v1/chat/completions"))
        .json(
            &json!({"model": TINY, "messages": user("Go on"), "max_tokens": 4000, "stream": true}),
        )
        .send()
        .unwrap();
    let mut stream = BufReader::new(stream);
    read_until(&mut stream, has_content);

    let asked = Instant::now();
    let request = std::thread::spawn({
        let url = app.url("/v1/chat/completions");
        move || {
            let body = json!({"model": slow, "messages": user("Hi"), "max_tokens": 1});
            let res = client().post(url).json(&body).send().unwrap();
            (res.status().as_u16(), res.text().unwrap(), Instant::now())
        }
    });
    let mut tokens = vec![asked];
    while !request.is_finished() {
        read_until(&mut stream, has_content);
        tokens.push(Instant::now());
    }
    let (status, body, answered) = request.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric(&app, "rewind_model_loads_total"), loads + 1.0);
    tokens.retain(|t| *t <= answered);
    tokens.push(answered);
    let load = answered - asked;
    let longest_gap = tokens.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!(
        "load and first answer {load:?}: {} tokens streamed meanwhile, longest gap {longest_gap:?}",
        tokens.len() - 2
    );
    assert!(
        load > Duration::from_millis(300),
        "the load ({load:?}) was too quick to show whether streams stall"
    );
    assert!(
        longest_gap < load / 2 && tokens.len() - 2 >= 10,
        "the stream stalled while the model loaded: longest gap {longest_gap:?} in {load:?}, {} tokens",
        tokens.len() - 2
    );
}

#[test]
fn health_and_metrics() {
    let app = tiny();
    let health: Value = client()
        .get(app.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    chat(
        app,
        json!({"model": TINY, "messages": user("hi"), "max_tokens": 2}),
    );
    let text = client()
        .get(app.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for name in [
        "rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "rewind_running_sequences",
        "rewind_waiting_requests",
        "rewind_time_to_first_token_seconds_bucket",
        "rewind_generation_tokens_per_second",
        "rewind_kv_cache_bytes",
        "rewind_kv_cache_budget_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert!(metric(app, "rewind_generated_tokens_total") >= 2.0);
}

/// `/metrics` parses as the Prometheus text format by default and as OpenMetrics for a scraper
/// that asks for it, with the latency histograms and their buckets; a chat completion of several
/// tokens feeds the time-to-first-token and inter-token latency histograms.
#[test]
fn metrics_parse_with_latency_histograms() {
    let app = tiny();
    let r = chat(
        app,
        json!({"model": TINY, "messages": user("Batch me"), "max_tokens": 8, "temperature": 0}),
    );
    assert!(
        r["usage"]["completion_tokens"].as_u64().unwrap() >= 2,
        "{r}"
    );
    const HISTOGRAMS: [&str; 4] = [
        "rewind_time_to_first_token_seconds",
        "rewind_inter_token_latency_seconds",
        "rewind_queue_wait_seconds",
        "rewind_decode_step_duration_seconds",
    ];
    for (accept, content_type) in [
        (None, "text/plain; version=0.0.4"),
        (
            Some("application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3"),
            "application/openmetrics-text; version=1.0.0",
        ),
    ] {
        let mut req = client().get(app.url("/metrics"));
        if let Some(accept) = accept {
            req = req.header("Accept", accept);
        }
        let res = req.send().unwrap();
        assert_eq!(res.status(), 200);
        let got = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(got.starts_with(content_type), "{got}");
        let text = res.text().unwrap();
        if accept.is_some() {
            assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
        }
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| s.value.clone())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        for name in HISTOGRAMS {
            let prometheus_parse::Value::Histogram(buckets) = value(name) else {
                panic!("{name} is not a histogram in\n{text}");
            };
            assert!(buckets.len() > 1, "{name}: {buckets:?}");
            assert!(
                buckets.iter().any(|b| b.less_than == f64::INFINITY),
                "{name} has no +Inf bucket"
            );
            let count = match value(&format!("{name}_count")) {
                prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
                other => panic!("{name}_count: {other:?}"),
            };
            let inf = buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .unwrap();
            assert_eq!(inf.count, count, "{name}");
            assert!(count > 0.0, "{name} observed nothing:\n{text}");
        }
        if accept.is_none() {
            // The classic format types counters under their `_total` name.
            assert!(scrape
                .samples
                .iter()
                .any(|s| s.metric == "rewind_requests_total"
                    && s.labels.get("endpoint") == Some("/v1/chat/completions")
                    && s.labels.get("status") == Some("200")
                    && matches!(s.value, prometheus_parse::Value::Counter(n) if n >= 1.0)));
            assert!(matches!(
                value("rewind_generation_tokens_per_second"),
                prometheus_parse::Value::Gauge(_)
            ));
        }
    }
}

#[test]
fn chat_completion_shape() {
    let app = tiny();
    let r = chat(
        app,
        json!({"model": TINY, "messages": user("Say something"), "max_tokens": 5, "store": true, "metadata": {"k": "v"}, "foo": 1}),
    );
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(
        (r["object"].as_str(), r["model"].as_str()),
        (Some("chat.completion"), Some(TINY))
    );
    let choice = &r["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(choice["logprobs"].is_null());
    let u = &r["usage"];
    let (p, c, t) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=5).contains(&c) && t == p + c, "{u}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
}

#[test]
fn max_tokens_one_gives_length() {
    let app = tiny();
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = json!({"model": TINY, "messages": user("Count"), "temperature": 0});
        body[field] = json!(1);
        let r = chat(app, body);
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{field}: {r}");
        assert_eq!(r["usage"]["completion_tokens"], 1);
    }
}

#[test]
fn stream_chunks_come_in_order() {
    let app = tiny();
    let body = json!({"model": TINY, "messages": user("Tell me"), "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}});
    let (chunks, done) = sse(app, "/v1/chat/completions", &body);
    assert!(done, "no [DONE]");
    let first = &chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"
        && c["id"] == first["id"]
        && c["created"] == first["created"]));
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter(|c| !c["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1, "exactly one finish_reason");
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let usage = &last["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    assert!(
        rest.iter().all(|c| c.get("usage") == Some(&Value::Null)),
        "earlier chunks carry usage: null"
    );
    // The finish chunk is the last one with choices.
    assert!(!rest.last().unwrap()["choices"][0]["finish_reason"].is_null());

    // Without include_usage there is no usage key at all.
    let body = json!({"model": TINY, "messages": user("Tell me"), "max_tokens": 3, "stream": true});
    let (chunks, done) = sse(app, "/v1/chat/completions", &body);
    assert!(done && chunks.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn streaming_equals_non_streaming_at_temperature_zero() {
    let app = tiny();
    let body = json!({"model": TINY, "messages": user("Write a story"), "max_tokens": 24, "temperature": 0});
    let full = chat(app, body.clone());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (chunks, _) = sse(app, "/v1/chat/completions", &streamed);
    assert_eq!(
        chat_stream_text(&chunks, 1)[0],
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );

    let body =
        json!({"model": TINY, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let (status, full) = post(app, "/v1/completions", &body);
    assert_eq!(status, 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (chunks, done) = sse(app, "/v1/completions", &streamed);
    assert!(done);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
}

#[test]
fn n_two_gives_two_choices() {
    let app = tiny();
    let r = chat(
        app,
        json!({"model": TINY, "messages": user("Hi"), "n": 2, "max_tokens": 6, "seed": 3}),
    );
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(choices.iter().all(|c| c["finish_reason"].is_string()));

    let body =
        json!({"model": TINY, "messages": user("Hi"), "n": 2, "max_tokens": 6, "stream": true});
    let (chunks, done) = sse(app, "/v1/chat/completions", &body);
    assert!(done);
    for index in 0..2 {
        let of_choice: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(
            of_choice[0]["delta"]["role"], "assistant",
            "choice {index} starts with its role"
        );
        assert_eq!(
            of_choice
                .iter()
                .filter(|c| !c["finish_reason"].is_null())
                .count(),
            1,
            "choice {index}"
        );
    }
}

#[test]
fn stop_strings_across_token_boundaries_are_excluded() {
    let app = tiny();
    // A stop string made of the end of one token and the start of the next, from the greedy
    // output of the first prompt that has two adjacent plain-ASCII tokens.
    let ascii = |s: &str| s.len() >= 2 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    let find_boundary = |prompt: &str| {
        let body = json!({"model": TINY, "messages": user(prompt), "max_tokens": 40, "temperature": 0, "logprobs": true});
        let r = chat(app, body.clone());
        let text = r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let tokens: Vec<String> = r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_string())
            .collect();
        let mut offset = 0;
        for pair in tokens.windows(2) {
            if ascii(&pair[0]) && ascii(&pair[1]) {
                let candidate = format!("{}{}", &pair[0][pair[0].len() - 1..], &pair[1][..1]);
                let at = offset + pair[0].len() - 1;
                if text.find(&candidate) == Some(at) {
                    return Some((body, text, candidate, at));
                }
            }
            offset += pair[0].len();
        }
        None
    };
    let (body, text, stop, at) = [
        "Go",
        "Tell me a story",
        "Hello there",
        "Count to ten",
        "Why?",
    ]
    .iter()
    .find_map(|p| find_boundary(p))
    .expect("no greedy output with two adjacent ASCII tokens");
    let mut body = body;
    body["stop"] = json!([stop]);
    let r = chat(app, body.clone());
    assert_eq!(
        r["choices"][0]["message"]["content"].as_str().unwrap(),
        &text[..at]
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (chunks, _) = sse(app, "/v1/chat/completions", &body);
    assert_eq!(chat_stream_text(&chunks, 1)[0], &text[..at]);
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "stop");
}

#[test]
fn logprobs_have_the_openai_shape() {
    let app = tiny();
    let r = chat(
        app,
        json!({"model": TINY, "messages": user("Hi"), "max_tokens": 3, "logprobs": true, "top_logprobs": 2}),
    );
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for entry in content {
        assert!(
            entry["token"].is_string()
                && entry["logprob"].as_f64().unwrap() <= 0.0
                && entry["bytes"].is_array()
        );
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
    }
    let (status, r) = post(
        app,
        "/v1/completions",
        &json!({"model": TINY, "prompt": "a", "max_tokens": 3, "logprobs": 2, "echo": true}),
    );
    assert_eq!(status, 200);
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        lp["token_logprobs"].as_array().unwrap().len()
    );
    assert!(
        r["choices"][0]["text"].as_str().unwrap().starts_with('a'),
        "echo"
    );
}

#[test]
fn completions_with_several_prompts() {
    let app = tiny();
    let (status, r) = post(
        app,
        "/v1/completions",
        &json!({"model": TINY, "prompt": ["one", "two"], "n": 2, "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"].as_array().unwrap().len(), 4);
    assert!(r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["text"].is_string() && c["finish_reason"].is_string()));
    // Token-id prompts too.
    let (status, _) = post(
        app,
        "/v1/completions",
        &json!({"model": TINY, "prompt": [1, 2, 3], "max_tokens": 1}),
    );
    assert_eq!(status, 200);
}

#[test]
fn errors_use_the_envelope_and_status() {
    let app = tiny();
    let cases = [
        (
            json!({"model": "nope", "messages": user("x")}),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "temperature": 5}),
            400,
            Some("temperature"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "temperature": "warm"}),
            400,
            Some("temperature"),
            Some("invalid_type"),
        ),
        (
            json!({"model": TINY}),
            400,
            Some("messages"),
            Some("missing_required_parameter"),
        ),
        (
            json!({"model": TINY, "messages": []}),
            400,
            Some("messages"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "n": 0}),
            400,
            Some("n"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "top_logprobs": 3}),
            400,
            Some("top_logprobs"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "logit_bias": {"99999999": 1}}),
            400,
            Some("logit_bias"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "response_format": {"type": "yaml"}}),
            400,
            Some("response_format"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "max_tokens": 9000}),
            400,
            Some("max_tokens"),
            Some("invalid_value"),
        ),
        (
            json!({"model": TINY, "messages": user("x"), "max_tokens": 4090}),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            json!({"model": TINY, "messages": user(&"word ".repeat(5000))}),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
    ];
    for (body, status, param, code) in cases {
        let (got, value) = post(app, "/v1/chat/completions", &body);
        assert_eq!(got, status, "{body}: {value}");
        let (kind, p, c) = error_of(&value);
        assert_eq!((p, c), (param, code), "{body}: {value}");
        assert_eq!(kind, "invalid_request_error");
    }
    let (status, value) = post(
        app,
        "/v1/completions",
        &json!({"model": TINY, "prompt": "x".repeat(10), "max_tokens": 4095}),
    );
    assert_eq!(
        (status, error_of(&value).2),
        (400, Some("context_length_exceeded"))
    );

    let res = client()
        .post(app.url("/v1/chat/completions"))
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(error_of(&res.json().unwrap()).2, Some("invalid_json"));
    // Bodies over the limit (1 MiB here) get 413.
    let big = json!({"model": TINY, "messages": user(&"x".repeat(2 << 20))});
    let res = client()
        .post(app.url("/v1/chat/completions"))
        .json(&big)
        .send()
        .unwrap();
    assert_eq!(res.status(), 413);
    error_of(&res.json().unwrap());
}

#[test]
fn cors_only_for_configured_origins() {
    let app = tiny();
    let res = client()
        .request(reqwest::Method::OPTIONS, app.url("/v1/chat/completions"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .unwrap();
    // actix-cors answers an allowed preflight with 200 and no body.
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        res.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
    let res = client()
        .get(app.url("/v1/models"))
        .header("Origin", "https://app.example")
        .send()
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let res = client()
        .get(app.url("/v1/models"))
        .header("Origin", "https://evil.example")
        .send()
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn tools_reach_a_template_that_supports_them() {
    let app = tiny();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let r = chat(
        app,
        json!({"model": TINY, "messages": user("Weather in Paris?"), "tools": tools, "max_tokens": 4}),
    );
    assert!(["stop", "length", "tool_calls"]
        .contains(&r["choices"][0]["finish_reason"].as_str().unwrap()));
    let body = json!({"model": TINY, "messages": user("Weather?"), "tools": tools, "max_tokens": 4, "stream": true});
    let (chunks, done) = sse(app, "/v1/chat/completions", &body);
    assert!(done && chunks[0]["choices"][0]["delta"]["role"] == "assistant");
    let bad = json!({"model": TINY, "messages": user("x"), "tools": [{"type": "function", "function": {"name": "no spaces"}}]});
    let (status, value) = post(app, "/v1/chat/completions", &bad);
    assert_eq!((status, error_of(&value).1), (400, Some("tools")));
}

#[test]
fn concurrent_streams_are_batched_and_all_correct() {
    let app = tiny();
    let body = json!({"model": TINY, "messages": user("Batch me"), "max_tokens": 48, "temperature": 0, "stream": true});
    let reference = {
        let mut b = body.clone();
        b["stream"] = json!(false);
        chat(app, b)["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let steps_before = metric(app, "rewind_decode_steps_total");
    let tokens_before = metric(app, "rewind_generated_tokens_total");
    let handles: Vec<_> = (0..32)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || sse(tiny(), "/v1/chat/completions", &body))
        })
        .collect();
    for h in handles {
        let (chunks, done) = h.join().unwrap();
        assert!(done);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            chat_stream_text(&chunks, 1)[0],
            reference,
            "a batched stream differs from the single request"
        );
    }
    // Many sequences shared each forward step (other tests may add a few steps meanwhile).
    let steps = metric(app, "rewind_decode_steps_total") - steps_before;
    let tokens = metric(app, "rewind_generated_tokens_total") - tokens_before;
    eprintln!("{steps} steps for {tokens} tokens");
    assert!(
        tokens >= 32.0 * 48.0 && steps < tokens / 3.0,
        "{steps} steps for {tokens} tokens"
    );
}

#[test]
fn fine_tuned_models_are_added_served_and_deleted_without_restart() {
    let app = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |_| {},
    );
    let id = "ft:tiny:acme:demo:abc12345";
    let spec = ModelSpec {
        id: id.into(),
        source: tiny_model().to_str().unwrap().into(),
        scheme: None,
        format: WeightFormat::F32,
        created: 1,
        owned_by: "acme".into(),
    };
    let done = app.server.engine.add_model(spec).unwrap();
    done.blocking_recv().unwrap().unwrap();
    let list: Value = client()
        .get(app.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == id && m["owned_by"] == "acme"));
    chat(
        &app,
        json!({"model": id, "messages": user("hi"), "max_tokens": 2}),
    );
    let stored = std::fs::read_to_string(app._data.path().join("models.json")).unwrap();
    assert!(stored.contains(id));

    let res = client()
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().unwrap();
    assert_eq!(
        (body["id"].as_str(), body["deleted"].as_bool()),
        (Some(id), Some(true))
    );
    let (status, _) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": id, "messages": user("hi")}),
    );
    assert_eq!(status, 404);
}

#[test]
fn api_keys_are_required_when_configured() {
    let app = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| s.server.api_keys = vec!["sk-test".into()],
    );
    let body = json!({"model": TINY, "messages": user("hi"), "max_tokens": 1});
    let res = client()
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(error_of(&res.json().unwrap()).2, Some("invalid_api_key"));
    let res = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        client().get(app.url("/health")).send().unwrap().status(),
        200
    );
    // Default deny: the legacy paths, metrics (not configured public) and unknown paths too.
    for path in [
        "/v1/models",
        "/fine_tunes",
        "/v1/fine-tunes",
        "/metrics",
        "/nowhere",
    ] {
        assert_eq!(
            client().get(app.url(path)).send().unwrap().status(),
            401,
            "{path}"
        );
    }
    let metrics = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| {
            s.server.api_keys = vec!["sk-test".into()];
            s.server.public_metrics = true;
        },
    );
    let res = client().get(metrics.url("/metrics")).send().unwrap();
    assert_eq!(res.status(), 200);
}

/// Reads SSE events from a live response until `pred` holds for one; returns it.
fn read_until(
    reader: &mut BufReader<reqwest::blocking::Response>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap();
            if pred(&v) {
                return v;
            }
        }
    }
}

fn has_content(v: &Value) -> bool {
    v["choices"][0]["delta"]["content"]
        .as_str()
        .is_some_and(|s| !s.is_empty())
}

#[test]
fn overload_gets_429_then_dropped_clients_free_their_slots() {
    let app = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| {
            s.limits.max_batch = 1;
            s.limits.max_queue = 1;
        },
    );
    // Long enough to still be running while the rest of the test happens.
    let long =
        json!({"model": TINY, "messages": user("Go on"), "max_tokens": 4000, "stream": true});
    let a = client()
        .post(app.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .unwrap();
    let mut a = BufReader::new(a);
    read_until(&mut a, has_content);
    // B waits for the one batch slot; its role chunk comes at once.
    let b = client()
        .post(app.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .unwrap();
    let mut b = BufReader::new(b);
    read_until(&mut b, |v| v["choices"][0]["delta"]["role"] == "assistant");
    // The queue (1) is full: C is turned away with Retry-After.
    let c = client()
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": TINY, "messages": user("x"), "max_tokens": 1}))
        .send()
        .unwrap();
    assert_eq!(c.status(), 429);
    assert!(c.headers().get("retry-after").is_some());
    let body: Value = c.json().unwrap();
    assert_eq!(error_of(&body).0, "rate_limit_error");

    // A's client goes away: its slot passes to B, whose tokens start flowing.
    drop(a);
    let started = Instant::now();
    read_until(&mut b, has_content);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(b);
    // Everything is freed and the server serves again.
    wait_until(Duration::from_secs(10), "slots were not freed", || {
        let (running, waiting) = (
            metric(&app, "rewind_running_sequences"),
            metric(&app, "rewind_waiting_requests"),
        );
        (running == 0.0 && waiting == 0.0)
            .then_some(())
            .ok_or(format!("{running} running, {waiting} waiting"))
    });
    assert!(metric(&app, "rewind_cancelled_requests_total") >= 2.0);
    let r = chat(
        &app,
        json!({"model": TINY, "messages": user("again"), "max_tokens": 3}),
    );
    assert!(r["choices"][0]["finish_reason"].is_string());
    assert!(
        metric(
            &app,
            "rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"429\"}"
        ) >= 1.0
    );

    // A non-streaming client that gives up is cancelled too.
    let cancelled = metric(&app, "rewind_cancelled_requests_total");
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut long = long;
    long["stream"] = json!(false);
    assert!(impatient
        .post(app.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .is_err());
    wait_until(
        Duration::from_secs(5),
        "the abandoned request kept running",
        || {
            let (now, running) = (
                metric(&app, "rewind_cancelled_requests_total"),
                metric(&app, "rewind_running_sequences"),
            );
            (now >= cancelled + 1.0 && running == 0.0)
                .then_some(())
                .ok_or(format!("{now} cancelled, {running} running"))
        },
    );
}

#[test]
fn default_model_answers_paris() {
    let app = smol();
    let body = json!({"model": SMOL, "messages": user("What is the capital of France?"), "temperature": 0, "max_tokens": 24});
    let r = chat(app, body.clone());
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (chunks, done) = sse(app, "/v1/chat/completions", &streamed);
    assert!(done);
    assert_eq!(chat_stream_text(&chunks, 1)[0], text);
}

#[test]
fn default_model_json_modes_give_valid_json() {
    let app = smol();
    let r = chat(
        app,
        json!({
            "model": SMOL,
            "messages": user("Describe a cat as a JSON object with the fields name and age."),
            "temperature": 0, "max_tokens": 80,
            "response_format": {"type": "json_object"}
        }),
    );
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{text}");
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(value.is_object());

    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": false});
    let r = chat(
        app,
        json!({
            "model": SMOL,
            "messages": user("Invent a person. Reply in JSON."),
            "temperature": 0, "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}
        }),
    );
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        value["name"].is_string() && value["age"].is_i64(),
        "{value}"
    );
    assert_eq!(value.as_object().unwrap().len(), 2);
}

/// The default model's chat template knows nothing of tools: they are described in its system
/// message in the generic format, and a required call comes back as a parsed tool call whose
/// arguments satisfy the tool's parameters.
#[test]
fn tools_reach_a_model_whose_template_has_none() {
    let app = smol();
    let parameters = json!({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": false
    });
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": parameters}}]);
    let r = chat(
        app,
        json!({"model": SMOL, "messages": user("What is the weather in Paris?"), "tools": tools,
               "tool_choice": "required", "temperature": 0, "max_tokens": 60}),
    );
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    // A conversation carrying an earlier call and its result renders and answers.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"}
    ]);
    let body = json!({"model": SMOL, "messages": history, "tools": tools, "max_tokens": 8});
    assert_eq!(post(app, "/v1/chat/completions", &body).0, 200);
    // tool_choice "none" means no tools are offered: accepted.
    let body = json!({"model": SMOL, "messages": user("x"), "tools": tools, "tool_choice": "none", "max_tokens": 1});
    assert_eq!(post(app, "/v1/chat/completions", &body).0, 200);
}

#[test]
fn requests_that_could_never_run_are_rejected_before_queueing() {
    // The tiny model's KV cache costs 512 bytes a position: 1 MiB holds 2048.
    let app = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| {
            s.limits.max_batch = 2;
            s.limits.kv_cache_mb = 1;
        },
    );
    let (status, value) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": TINY, "messages": user("x"), "n": 3, "max_tokens": 2}),
    );
    assert_eq!((status, error_of(&value).1), (400, Some("n")), "{value}");
    let (status, value) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": TINY, "messages": user("x"), "max_tokens": 3000}),
    );
    assert_eq!(
        (status, error_of(&value).1),
        (400, Some("max_tokens")),
        "{value}"
    );
    let r = chat(
        &app,
        json!({"model": TINY, "messages": user("x"), "n": 2, "max_tokens": 500}),
    );
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
}

/// A prompt longer than `limits.max_prefill_tokens` is fed over several steps while another
/// stream keeps decoding, and answers exactly as it does when prefilled in one step.
#[test]
fn long_prompts_are_prefilled_in_chunks_without_changing_the_answer() {
    let chunked = spawn_app(
        &[(TINY, tiny_model().to_str().unwrap(), WeightFormat::F32)],
        |s| s.limits.max_prefill_tokens = 8,
    );
    let long = "a fairly long prompt that needs several prefill chunks ".repeat(4);
    let body = json!({"model": TINY, "messages": user(&long), "max_tokens": 24, "temperature": 0});
    let text = |app: &App| {
        chat(app, body.clone())["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let steps_before = metric(&chunked, "rewind_decode_steps_total");
    let answer = text(&chunked);
    let steps = metric(&chunked, "rewind_decode_steps_total") - steps_before;
    assert_eq!(answer, text(tiny()), "chunked prefill changed the answer");
    let (status, usage) = post(&chunked, "/v1/chat/completions", &body);
    assert_eq!(status, 200);
    let prompt_tokens = usage["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(
        steps >= (prompt_tokens / 8.0).ceil(),
        "{prompt_tokens} prompt tokens fed in {steps} steps of at most 8"
    );
}

// ---------------------------------------------------------------------------------------------
// Structured outputs and forced tool calls on the real default model.

/// Nested objects, an array of `$ref`s, enums, a `pattern` and numeric and length bounds.
fn event_schema() -> Value {
    json!({
        "type": "object",
        "$defs": {"person": {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "role": {"type": "string", "enum": ["host", "guest", "speaker"]}},
            "required": ["name", "role"], "additionalProperties": false}},
        "properties": {
            "event": {"type": "string", "maxLength": 40},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "day": {"type": "string", "enum": ["monday", "tuesday", "friday"]},
            "venue": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "seats": {"type": "integer", "minimum": 1, "maximum": 500}},
                "required": ["city", "seats"], "additionalProperties": false},
            "participants": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 1, "maxItems": 3}},
        "required": ["event", "code", "day", "venue", "participants"],
        "additionalProperties": false
    })
}

/// A recursive tree.
fn tree_schema() -> Value {
    json!({
        "$defs": {"node": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 12},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["label", "children"], "additionalProperties": false}},
        "$ref": "#/$defs/node"
    })
}

/// OpenAI's function-calling example, and a second tool.
fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and country, e.g. Paris, France"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["location", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a timezone",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"], "additionalProperties": false}}}
    ])
}

/// The default model's weights under a chat template that renders `tools` (its own has none),
/// written once per test run.
fn smol_tools() -> &'static App {
    static APP: OnceLock<(tempfile::TempDir, App)> = OnceLock::new();
    &APP.get_or_init(|| {
        use rewind::model::loader::{load, save::save_model, LoadOptions};
        use rewind::text::chat_template::ChatTemplate;
        let loaded = load(
            &common::default_model(),
            &LoadOptions {
                format: WeightFormat::F32,
                device: candle_core::Device::Cpu,
                reversible: None,
            },
        )
        .unwrap();
        let template =
            ChatTemplate::new("tools", TOOLS_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("smol-tools");
        save_model(
            &loaded.model,
            &loaded.tokenizer,
            &template,
            &dir,
            candle_core::DType::BF16,
        )
        .unwrap();
        let app = spawn_app(&[(SMOL, dir.to_str().unwrap(), WeightFormat::F32)], |_| {});
        (tmp, app)
    })
    .1
}

/// What a constrained request is checked against.
#[derive(Clone)]
enum Expect {
    /// The reply's content validates against this schema.
    Content(Value),
    /// The reply is one call of one of these tools (of this one when named), its arguments
    /// valid against the tool's parameters.
    Call(Value, Option<&'static str>),
    /// Free text.
    Text,
}

/// Sends `body` (streamed or not) and checks the reply against `expect`.
fn check_reply(app: &App, mut body: Value, stream: bool, expect: &Expect) {
    body["model"] = json!(SMOL);
    body["stream"] = json!(stream);
    let (content, calls, finish) = if stream {
        let (chunks, done) = sse(app, "/v1/chat/completions", &body);
        assert!(done);
        let content = chat_stream_text(&chunks, 1).remove(0);
        let calls: Vec<Value> = chunks
            .iter()
            .flat_map(|c| {
                c["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(String::from))
            .unwrap();
        (content, calls, finish)
    } else {
        let r = chat(app, body);
        let choice = &r["choices"][0];
        let content = choice["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let calls = choice["message"]["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (
            content,
            calls,
            choice["finish_reason"].as_str().unwrap().to_string(),
        )
    };
    match expect {
        Expect::Content(schema) => {
            assert_eq!(finish, "stop", "{content}");
            let value: Value =
                serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content}"));
            if let Err(e) = jsonschema::validate(schema, &value) {
                panic!("{e}: {content}");
            }
        }
        Expect::Call(tools, named) => {
            assert_eq!(finish, "tool_calls", "{content} {calls:?}");
            assert_eq!(calls.len(), 1, "{calls:?}");
            let function = &calls[0]["function"];
            let name = function["name"].as_str().unwrap();
            if let Some(named) = named {
                assert_eq!(name, *named);
            }
            let tool = tools
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["function"]["name"] == name)
                .unwrap_or_else(|| panic!("no tool {name}"));
            let arguments: Value = serde_json::from_str(function["arguments"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{e}: {function}"));
            if let Err(e) = jsonschema::validate(&tool["function"]["parameters"], &arguments) {
                panic!("{e}: {arguments}");
            }
        }
        Expect::Text => assert!(["stop", "length"].contains(&finish.as_str())),
    }
}

fn schema_request(prompt: &str, name: &str, schema: &Value, max_tokens: u32) -> Value {
    json!({
        "messages": user(prompt), "temperature": 0, "max_tokens": max_tokens,
        "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": true}}
    })
}

fn event_request() -> (Value, Expect) {
    let body = schema_request(
        "Describe a small conference in Paris as JSON: its name, an event code, the day, the venue and up to three participants.",
        "event",
        &event_schema(),
        250,
    );
    (body, Expect::Content(event_schema()))
}

fn tree_request() -> (Value, Expect) {
    let body = schema_request(
        "Reply with this family tree as JSON, exactly: {\"label\": \"Ann\", \"children\": [{\"label\": \"Bob\", \"children\": []}, {\"label\": \"Cy\", \"children\": []}]}",
        "tree",
        &tree_schema(),
        250,
    );
    (body, Expect::Content(tree_schema()))
}

fn tool_request(choice: Value, named: Option<&'static str>) -> (Value, Expect) {
    let body = json!({
        "messages": user("What is the weather like in Paris today?"),
        "temperature": 0, "max_tokens": 120,
        "tools": weather_tools(), "tool_choice": choice
    });
    (body, Expect::Call(weather_tools(), named))
}

#[test]
fn structured_outputs_validate_against_their_schemas() {
    let app = smol();
    for (body, expect) in [event_request(), tree_request()] {
        for stream in [false, true] {
            check_reply(app, body.clone(), stream, &expect);
        }
    }
}

#[test]
fn required_and_named_tool_calls_are_enforced() {
    let app = smol_tools();
    for (body, expect) in [
        tool_request(json!("required"), None),
        tool_request(
            json!({"type": "function", "function": {"name": "get_time"}}),
            Some("get_time"),
        ),
    ] {
        for stream in [false, true] {
            check_reply(app, body.clone(), stream, &expect);
        }
    }
    // Parameters llguidance cannot compile are a 400 naming `tools`.
    let bad = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "tuple"}}}}}]);
    let (status, value) = post(
        app,
        "/v1/chat/completions",
        &json!({"model": SMOL, "messages": user("x"), "tools": bad, "tool_choice": "required"}),
    );
    assert_eq!(
        (status, error_of(&value).1),
        (400, Some("tools")),
        "{value}"
    );
}

#[test]
fn constrained_and_free_requests_batch_together() {
    let app = smol_tools();
    let free = |prompt: &str| {
        (
            json!({"messages": user(prompt), "temperature": 0.8, "seed": 3, "max_tokens": 30}),
            Expect::Text,
        )
    };
    let mut requests = vec![
        (event_request(), false),
        (tree_request(), true),
        (tool_request(json!("required"), None), false),
        (
            tool_request(
                json!({"type": "function", "function": {"name": "get_weather"}}),
                Some("get_weather"),
            ),
            true,
        ),
    ];
    for (i, prompt) in [
        "Tell me a joke.",
        "Name three colours.",
        "What is 2 + 2?",
        "Say hello.",
    ]
    .iter()
    .enumerate()
    {
        requests.push((free(prompt), i % 2 == 0));
    }
    std::thread::scope(|s| {
        for ((body, expect), stream) in requests {
            s.spawn(move || check_reply(app, body, stream, &expect));
        }
    });
}

/// The `structured_outputs` extension: a regex, a choice and a Lark grammar hold on the real
/// model, in chat and in legacy completions; a malformed one is a 400 naming it.
#[test]
fn structured_outputs_regex_choice_and_grammar_hold() {
    let app = smol();
    let reply = |body: Value| {
        chat(app, body)["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let code = reply(
        json!({"model": SMOL, "messages": user("Give me a product code."), "temperature": 0,
        "max_tokens": 20, "structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}}),
    );
    assert!(
        code.len() == 6
            && code[..3].bytes().all(|b| b.is_ascii_uppercase())
            && &code[3..4] == "-"
            && code[4..].bytes().all(|b| b.is_ascii_digit()),
        "{code:?}"
    );
    let answer = reply(
        json!({"model": SMOL, "messages": user("Is Paris in France?"), "temperature": 0,
        "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}}),
    );
    assert!(answer == "yes" || answer == "no", "{answer:?}");
    let (status, r) = post(
        app,
        "/v1/completions",
        &json!({"model": SMOL, "prompt": "Count: ", "temperature": 0, "max_tokens": 16,
                "structured_outputs": {"grammar": "start: \"1\" (\", \" NUM)*\nNUM: /[0-9]/\n"}}),
    );
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with('1')
            && text
                .split(", ")
                .all(|n| n.len() == 1 && n.bytes().all(|b| b.is_ascii_digit())),
        "{text:?}"
    );
    let (status, e) = post(
        app,
        "/v1/chat/completions",
        &json!({"model": SMOL, "messages": user("x"), "structured_outputs": {"regex": "a", "choice": ["b"]}}),
    );
    assert_eq!(status, 400);
    assert_eq!(error_of(&e).1, Some("structured_outputs"));
}
