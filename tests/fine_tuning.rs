//! Black-box tests of the fine-tuning service: files, jobs, the legacy fine-tunes views, and
//! persistence across a restart. Each starts the real server on port 0 with a temporary data
//! directory; jobs train a tiny random model (2 layers, d = 64, SmolLM2's tokenizer) so the
//! whole file runs in well under a minute on two cores.

mod common;

use common::{client, poll_until, tiny_chatml_model, wait_until, ServeProcess, TINY};
use rewind::api::RunningServer;
use rewind::model::loader::WeightFormat;
use rewind::settings::{ModelSettings, Settings};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

struct App {
    server: RunningServer,
}

impl App {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }
}

/// Starts a server on `data` (port 0) serving the tiny model and waits until it is healthy.
fn spawn_app(data: &Path) -> App {
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.data_dir = data.to_path_buf();
    settings.fine_tuning.max_file_bytes = 64 << 10;
    settings.models = vec![ModelSettings {
        id: Some(TINY.into()),
        source: tiny_chatml_model().to_str().unwrap().into(),
        scheme: None,
        format: WeightFormat::F32,
    }];
    let app = App {
        server: rewind::api::start(settings).unwrap(),
    };
    wait_until_healthy(&app, Duration::from_secs(60));
    app
}

fn wait_until_healthy(app: &App, limit: Duration) {
    wait_until(limit, "the model did not load", || {
        match client().get(app.url("/health")).send().unwrap().status() {
            reqwest::StatusCode::OK => Ok(()),
            status => Err(status.to_string()),
        }
    })
}

fn get(app: &App, path: &str) -> (u16, Value) {
    let res = client().get(app.url(path)).send().unwrap();
    (res.status().as_u16(), res.json().unwrap_or(Value::Null))
}

fn post(app: &App, path: &str, body: &Value) -> (u16, Value) {
    let res = client().post(app.url(path)).json(body).send().unwrap();
    (res.status().as_u16(), res.json().unwrap_or(Value::Null))
}

fn upload(app: &App, name: &str, content: Vec<u8>, purpose: &str) -> (u16, Value) {
    let form = reqwest::blocking::multipart::Form::new()
        .text("purpose", purpose.to_string())
        .part(
            "file",
            reqwest::blocking::multipart::Part::bytes(content).file_name(name.to_string()),
        );
    let res = client()
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .unwrap();
    (res.status().as_u16(), res.json().unwrap_or(Value::Null))
}

fn training_data() -> Vec<u8> {
    std::fs::read(common::fixture("facts_train.jsonl")).unwrap()
}

/// Polls a job until it reaches a terminal status.
fn wait_for(app: &App, id: &str) -> Value {
    wait_until(Duration::from_secs(90), "job not finished", || {
        let (status, job) = get(app, &format!("/v1/fine_tuning/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        match job["status"].as_str().unwrap() {
            "succeeded" | "failed" | "cancelled" => Ok(job),
            _ => Err(job.to_string()),
        }
    })
}

/// Polls chat completions with `body` until one succeeds (a model still loading answers 503).
fn wait_until_answered(app: &App, body: &Value) {
    wait_until(Duration::from_secs(30), "no answer", || {
        match post(app, "/v1/chat/completions", body) {
            (200, _) => Ok(()),
            (status, reply) => Err(format!("{status} {reply}")),
        }
    });
}

/// Creates a 6-epoch job (48 steps) on the tiny model and waits until it has trained `steps`.
fn start_job(app: &App, file_id: &Value, steps: usize) -> String {
    let (_, job) = post(
        app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file_id, "hyperparameters": {"n_epochs": 6, "batch_size": 1}}),
    );
    let id = job["id"].as_str().unwrap().to_string();
    wait_for_steps(app, &id, steps);
    id
}

fn wait_for_steps(app: &App, id: &str, steps: usize) {
    wait_until(Duration::from_secs(60), "too few training steps", || {
        let done = metric_steps(app, id);
        if done.len() >= steps {
            Ok(())
        } else {
            Err(format!("{done:?}"))
        }
    });
}

/// The messages of a job's events, newest first.
fn event_messages(app: &App, id: &str) -> Vec<String> {
    all_events(app, id)
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

fn all_events(app: &App, id: &str) -> Vec<Value> {
    let (status, page) = get(app, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"));
    assert_eq!(status, 200);
    page["data"].as_array().unwrap().clone()
}

#[test]
fn files_are_validated_listed_and_deleted() {
    let data = tempfile::tempdir().unwrap();
    let app = spawn_app(data.path());

    let (status, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    assert_eq!(status, 200, "{file}");
    assert_eq!(
        (
            file["object"].as_str(),
            file["status"].as_str(),
            file["purpose"].as_str()
        ),
        (Some("file"), Some("processed"), Some("fine-tune"))
    );
    assert_eq!(file["filename"], "facts.jsonl");
    assert_eq!(file["bytes"].as_u64(), Some(training_data().len() as u64));
    let id = file["id"].as_str().unwrap();
    assert!(id.starts_with("file-"));

    let content = client()
        .get(app.url(&format!("/v1/files/{id}/content")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(content.as_ref(), training_data().as_slice());
    let (_, other) = upload(&app, "two.jsonl", training_data(), "fine-tune");
    let (status, list) = get(&app, "/v1/files?limit=1");
    assert_eq!(status, 200);
    assert_eq!(
        (list["data"][0]["id"].as_str(), list["has_more"].as_bool()),
        (other["id"].as_str(), Some(true))
    );
    let (_, rest) = get(
        &app,
        &format!("/v1/files?limit=1&after={}", other["id"].as_str().unwrap()),
    );
    assert_eq!(
        (rest["data"][0]["id"].as_str(), rest["has_more"].as_bool()),
        (Some(id), Some(false))
    );

    // Bad JSONL: each rule is named with its line.
    for (bad, expect) in [
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{not json\n", "line 2"),
        ("{\"prompt\": 1}\n", "line 1"),
        ("{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n", "wizard"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n", "assistant"),
        ("[1, 2]\n", "JSON object"),
    ] {
        let (status, body) = upload(&app, "bad.jsonl", bad.as_bytes().to_vec(), "fine-tune");
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expect), "{message}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let (status, body) = upload(&app, "big.jsonl", vec![b' '; 100 << 10], "fine-tune");
    assert_eq!(status, 413, "{body}");
    let (status, _) = upload(&app, "x.jsonl", training_data(), "homework");
    assert_eq!(status, 400);

    let res = client()
        .delete(app.url(&format!("/v1/files/{id}")))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, body) = get(&app, &format!("/v1/files/{id}"));
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        client()
            .delete(app.url(&format!("/v1/files/{id}")))
            .send()
            .unwrap()
            .status(),
        404
    );
}

#[test]
fn a_job_trains_serves_its_model_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let app = spawn_app(data.path());
    let (_, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    let file_id = file["id"].as_str().unwrap().to_string();

    // Bad requests.
    let (status, body) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": "gpt-9", "training_file": file_id}),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": "file-nope"}),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["param"], "training_file");
    let (status, body) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file_id, "hyperparameters": {"n_epochs": 0}}),
    );
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("hyperparameters.n_epochs")),
        "{body}"
    );
    let (status, _) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file_id, "suffix": "x".repeat(65)}),
    );
    assert_eq!(status, 400);

    let (status, job) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({
            "model": TINY, "training_file": file_id, "suffix": "facts", "seed": 3, "metadata": {"k": "v"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 30}}}
        }),
    );
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert!(
        ["queued", "running"].contains(&job["status"].as_str().unwrap()),
        "{job}"
    );
    let job_id = job["id"].as_str().unwrap().to_string();
    assert!(job_id.starts_with("ftjob-"));

    let job = wait_for(&app, &job_id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["hyperparameters"],
        json!({"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 30.0})
    );
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);
    assert_eq!(job["metadata"], json!({"k": "v"}));
    let model = job["fine_tuned_model"].as_str().unwrap().to_string();
    assert!(model.starts_with("ft:tiny:rewind:facts:"), "{model}");

    // Events (newest first), with a falling loss curve.
    let events = all_events(&app, &job_id);
    assert_eq!(events[0]["message"], "The job has successfully completed");
    let losses: Vec<f64> = events
        .iter()
        .rev()
        .filter(|e| e["type"] == "metrics")
        .filter_map(|e| e["data"]["train_loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 6, "2 steps per epoch, 3 epochs");
    assert!(losses[5] < losses[0], "the loss did not fall: {losses:?}");
    let (_, page) = get(
        &app,
        &format!("/v1/fine_tuning/jobs/{job_id}/events?limit=2"),
    );
    assert_eq!(page["has_more"], true);
    let (_, next) = get(
        &app,
        &format!(
            "/v1/fine_tuning/jobs/{job_id}/events?limit=2&after={}",
            page["data"][1]["id"].as_str().unwrap()
        ),
    );
    assert_eq!(next["data"][0]["id"], events[2]["id"]);

    // One checkpoint per epoch.
    let (_, checkpoints) = get(&app, &format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"));
    let steps: Vec<u64> = checkpoints["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [6, 4, 2]);
    assert!(checkpoints["data"][0]["fine_tuned_model_checkpoint"]
        .as_str()
        .unwrap()
        .ends_with(":ckpt-step-6"));

    // Result files: the metrics CSV and the loss plot.
    let results = job["result_files"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let csv = client()
        .get(app.url(&format!(
            "/v1/files/{}/content",
            results[0].as_str().unwrap()
        )))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(csv.starts_with("step,epoch,train_loss"), "{csv}");
    assert_eq!(csv.lines().count(), 7);
    let svg = client()
        .get(app.url(&format!(
            "/v1/files/{}/content",
            results[1].as_str().unwrap()
        )))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(svg.starts_with("<svg"));

    // The model is served at once.
    let (status, models) = get(&app, "/v1/models");
    assert_eq!(status, 200);
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == model.as_str()));
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of Zorblax?"}], "max_tokens": 4});
    let (status, reply) = post(&app, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{reply}");

    // Every epoch's checkpoint is a model of its own: listed and served.
    let (_, models) = get(&app, "/v1/models");
    for c in checkpoints["data"].as_array().unwrap() {
        let name = c["fine_tuned_model_checkpoint"].as_str().unwrap();
        assert!(
            models["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == name),
            "{name} not in {models}"
        );
        let ask = json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        let (status, reply) = post(&app, "/v1/chat/completions", &ask);
        assert_eq!(status, 200, "{name}: {reply}");
    }

    // Cancelling a finished job is refused.
    let (status, body) = post(
        &app,
        &format!("/v1/fine_tuning/jobs/{job_id}/cancel"),
        &json!({}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        post(&app, "/v1/fine_tuning/jobs/ftjob-nope/cancel", &json!({})).0,
        404
    );

    // The legacy API shows the same job.
    let (status, legacy) = get(&app, &format!("/v1/fine-tunes/{job_id}"));
    assert_eq!(status, 200, "{legacy}");
    assert_eq!(
        (legacy["object"].as_str(), legacy["status"].as_str()),
        (Some("fine-tune"), Some("succeeded"))
    );
    assert_eq!(legacy["training_files"][0]["id"], file_id.as_str());
    assert_eq!(legacy["result_files"].as_array().unwrap().len(), 2);
    let (status, list) = get(&app, "/fine_tunes");
    assert_eq!(
        (status, list["data"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    let text = client()
        .get(app.url(&format!("/v1/fine-tunes/{job_id}/events?stream=true")))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"object\":\"fine-tune-event\""));

    // Restart on the same data directory: everything is still there, the model is served again.
    app.server.stop();
    let app = spawn_app(data.path());
    assert_eq!(get(&app, &format!("/v1/files/{file_id}")).0, 200);
    let (_, again) = get(&app, &format!("/v1/fine_tuning/jobs/{job_id}"));
    assert_eq!(
        (again["status"].as_str(), again["fine_tuned_model"].as_str()),
        (Some("succeeded"), Some(model.as_str()))
    );
    assert_eq!(all_events(&app, &job_id).len(), events.len());
    let (_, checkpoints) = get(&app, &format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"));
    assert_eq!(checkpoints["data"].as_array().unwrap().len(), 3);
    wait_until_answered(&app, &chat);

    // Checkpoint models are served again too.
    let newest = checkpoints["data"][0]["fine_tuned_model_checkpoint"].clone();
    let ask =
        json!({"model": newest, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    wait_until_answered(&app, &ask);

    // Deleting the model stops serving it and removes its weights.
    let weights = data.path().join("models").join(&job_id);
    assert!(weights.exists(), "{}", weights.display());
    let res = client()
        .delete(app.url(&format!("/v1/models/{model}")))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(post(&app, "/v1/chat/completions", &chat).0, 404);
    assert!(!weights.exists());
}

#[test]
fn legacy_reversible_lora_failed_and_cancelled_jobs() {
    let data = tempfile::tempdir().unwrap();
    let app = spawn_app(data.path());
    let (_, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    let (status, job) = post(
        &app,
        "/v1/fine-tunes",
        &json!({"training_file": file["id"], "model": TINY, "n_epochs": 2, "batch_size": 8, "suffix": "rev",
                "rewind": {"scheme": "midpoint", "lora_rank": 4}}),
    );
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["object"], "fine-tune");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_for(&app, &id);
    assert_eq!(done["status"], "succeeded", "{done}");
    let messages = event_messages(&app, &id);
    assert!(
        messages
            .iter()
            .any(|m| m.contains("strategy reversible") && m.contains("LoRA rank 4")),
        "{messages:?}"
    );

    // A job that cannot train fails with an error object: euler is not a reversible scheme.
    let (status, job) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file["id"], "rewind": {"strategy": "reversible"}}),
    );
    assert_eq!(status, 200, "{job}");
    let failed = wait_for(&app, job["id"].as_str().unwrap());
    assert_eq!(
        (failed["status"].as_str(), failed["error"]["code"].as_str()),
        (Some("failed"), Some("training_failed")),
        "{failed}"
    );
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reversible scheme"),
        "{failed}"
    );
    let (status, _) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file["id"], "rewind": {"strategy": "sideways"}}),
    );
    assert_eq!(status, 400);

    // A long job, cancelled while it runs (or still queued).
    let (status, long) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file["id"], "hyperparameters": {"n_epochs": 50, "batch_size": 1}}),
    );
    assert_eq!(status, 200, "{long}");
    let long_id = long["id"].as_str().unwrap();
    let (status, cancelled) = post(
        &app,
        &format!("/v1/fine_tuning/jobs/{long_id}/cancel"),
        &json!({}),
    );
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    // The trainer stops and its saved state, of no use to a cancelled job, goes.
    let state = data.path().join("jobs").join(long_id).join("checkpoint");
    let cancelled_at = Instant::now();
    wait_until(Duration::from_secs(30), "the state stayed", || {
        // Also a moment longer, in case the trainer had not created it yet.
        let settled = cancelled_at.elapsed() > Duration::from_millis(500);
        (settled && !state.exists())
            .then_some(())
            .ok_or(state.display().to_string())
    });
    let (_, after) = get(&app, &format!("/v1/fine_tuning/jobs/{long_id}"));
    assert_eq!(
        (after["status"].as_str(), after["fine_tuned_model"].as_str()),
        (Some("cancelled"), None)
    );
    assert_eq!(
        post(
            &app,
            &format!("/v1/fine_tuning/jobs/{long_id}/cancel"),
            &json!({})
        )
        .0,
        400
    );
}

/// Waits for a `start_job` job to succeed having trained each of its 48 steps once, in order.
fn succeeds_training_each_step_once(app: &App, id: &str) {
    let done = wait_for(app, id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        metric_steps(app, id),
        (1..=48).collect::<Vec<u64>>(),
        "each step once, in order"
    );
}

/// Steps of a job's metrics events, in order.
fn metric_steps(app: &App, id: &str) -> Vec<u64> {
    let mut steps: Vec<u64> = all_events(app, id)
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    steps.reverse();
    steps
}

/// A running job paused stops training (having saved its state), stays paused, and when
/// resumed continues from where it stopped: every step trained exactly once overall.
#[test]
fn a_paused_job_resumes_where_it_stopped() {
    let data = tempfile::tempdir().unwrap();
    let app = spawn_app(data.path());
    let (_, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    let id = start_job(&app, &file["id"], 3);
    let pause = format!("/v1/fine_tuning/jobs/{id}/pause");
    let resume = format!("/v1/fine_tuning/jobs/{id}/resume");
    assert_eq!(post(&app, &resume, &json!({})).0, 400, "not paused yet");
    let (status, paused) = post(&app, &pause, &json!({}));
    assert_eq!(
        (status, paused["status"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (status, again) = post(&app, &pause, &json!({}));
    assert_eq!(status, 400, "{again}");
    assert_eq!(again["error"]["code"], "invalid_state");
    assert_eq!(
        post(&app, "/v1/fine_tuning/jobs/ftjob-none/pause", &json!({})).0,
        404
    );

    // Training stops: no new steps arrive while paused.
    std::thread::sleep(Duration::from_millis(1500));
    let before = metric_steps(&app, &id);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(metric_steps(&app, &id), before, "trained while paused");
    let (_, job) = get(&app, &format!("/v1/fine_tuning/jobs/{id}"));
    assert_eq!(job["status"], "paused");
    assert!(
        before.len() < 48,
        "the job finished before the pause took effect"
    );

    let (status, resumed) = post(&app, &resume, &json!({}));
    assert_eq!(
        (status, resumed["status"].as_str()),
        (200, Some("queued")),
        "{resumed}"
    );
    succeeds_training_each_step_once(&app, &id);
    let messages = event_messages(&app, &id);
    for wanted in [
        "Job paused.",
        "Job resumed.",
        "continues from its checkpoint",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(wanted)),
            "{wanted}: {messages:?}"
        );
    }

    // A paused job can be cancelled; the state it saved for resuming goes with it.
    let id = start_job(&app, &file["id"], 1);
    post(
        &app,
        &format!("/v1/fine_tuning/jobs/{id}/pause"),
        &json!({}),
    );
    let state = data.path().join("jobs").join(&id).join("checkpoint");
    wait_until(Duration::from_secs(30), "the pause saved nothing", || {
        let saved = state.join("state.json");
        saved
            .exists()
            .then_some(())
            .ok_or(saved.display().to_string())
    });
    // Until the trainer has stopped: no new steps for a second.
    wait_until(Duration::from_secs(30), "still training", || {
        let before = metric_steps(&app, &id);
        std::thread::sleep(Duration::from_millis(1000));
        let after = metric_steps(&app, &id);
        (after == before).then_some(()).ok_or(format!("{after:?}"))
    });
    let (status, cancelled) = post(
        &app,
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        &json!({}),
    );
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    assert!(!state.exists(), "{}", state.display());
}

/// A resume sent right after its pause races the trainer. Either it reaches the trainer before it
/// stops (the job reads `running` and trains on) or the trainer has stopped (the job reads
/// `queued` and continues from its checkpoint); never a trainer at work on a `queued` job, and
/// every step is trained once.
#[test]
fn a_resume_racing_its_pause_keeps_the_job_running_or_requeues_it() {
    let data = tempfile::tempdir().unwrap();
    let app = spawn_app(data.path());
    let (_, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    let id = start_job(&app, &file["id"], 2);
    let (status, paused) = post(
        &app,
        &format!("/v1/fine_tuning/jobs/{id}/pause"),
        &json!({}),
    );
    assert_eq!(status, 200, "{paused}");
    let (status, resumed) = post(
        &app,
        &format!("/v1/fine_tuning/jobs/{id}/resume"),
        &json!({}),
    );
    assert_eq!(status, 200, "{resumed}");
    let resumed_to = resumed["status"].as_str().unwrap().to_string();
    println!("resumed to `{resumed_to}`");
    assert!(
        ["running", "queued"].contains(&resumed_to.as_str()),
        "{resumed}"
    );

    succeeds_training_each_step_once(&app, &id);
    let continued = event_messages(&app, &id)
        .iter()
        .any(|m| m.contains("continues from its checkpoint"));
    assert_eq!(
        continued,
        resumed_to == "queued",
        "a job resumed to `{resumed_to}` must continue from its checkpoint exactly when it was queued"
    );
}

#[test]
fn a_job_killed_mid_run_resumes_from_its_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(data.path(), tiny_chatml_model(), "");
    let file = server.upload(training_data());
    let (status, job) = server.post(
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file["id"], "hyperparameters": {"n_epochs": 10, "batch_size": 1}}),
    );
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let events_path = format!("/v1/fine_tuning/jobs/{id}/events?limit=10000");

    // Kill -9 once the first epoch's checkpoint is written.
    wait_until(Duration::from_secs(60), "no checkpoint", || {
        let events = server.get(&events_path);
        let checkpointed = events["data"].as_array().unwrap().iter().any(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("Checkpoint created")
        });
        checkpointed.then_some(()).ok_or(events.to_string())
    });
    drop(server);
    let before: Vec<Value> = ServeProcess::start(data.path(), tiny_chatml_model(), "")
        .get(&events_path)["data"]
        .as_array()
        .unwrap()
        .clone();
    // (That server instance is dropped at once too: the second restart must resume as well.)
    let server = ServeProcess::start(data.path(), tiny_chatml_model(), "");
    let job = server.finished_job(&id);
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = server.get(&events_path)["data"].as_array().unwrap().clone();
    // Nothing recorded before the kills is lost.
    for e in &before {
        assert!(events.iter().any(|x| x["id"] == e["id"]), "lost event {e}");
    }
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .contains("resuming from the last checkpoint")));
    // Steps trained twice (after the checkpoint, before a kill) reproduce the same loss.
    let seen = common::step_losses(&events);
    assert_eq!(seen.len(), 80, "every step has metrics");
    // Ten epochs, ten checkpoints made; the last three kept, the older ones' weights deleted.
    let checkpoints = server.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100"));
    let steps: Vec<u64> = checkpoints["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.len(), rewind::jobs::runner::KEPT_CHECKPOINTS);
    assert_eq!(steps, [80, 72, 64]);
    let kept: Vec<_> = std::fs::read_dir(data.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("-step-"))
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
}

/// The end-to-end check on the real default model: a LoRA job on the facts file teaches
/// it an answer the base model does not give. About 2 minutes on two cores, so run on demand:
/// `cargo test --release --test fine_tuning -- --ignored`.
#[test]
#[ignore]
fn the_default_model_learns_the_training_data() {
    let data = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.data_dir = data.path().to_path_buf();
    let app = App {
        server: rewind::api::start(settings).unwrap(),
    };
    wait_until_healthy(&app, Duration::from_secs(120));
    let (_, models) = get(&app, "/v1/models");
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let (_, file) = upload(&app, "facts.jsonl", training_data(), "fine-tune");
    let (status, job) = post(
        &app,
        "/v1/fine_tuning/jobs",
        &json!({"model": base, "training_file": file["id"], "seed": 1, "rewind": {"lora_rank": 8},
                "hyperparameters": {"n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 10}}),
    );
    assert_eq!(status, 200, "{job}");
    let path = format!("/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap());
    // Polled once a second: the real model trains on the same two cores.
    let (limit, every) = (Duration::from_secs(400), Duration::from_secs(1));
    let job = poll_until(limit, every, "job not finished", || {
        let (_, job) = get(&app, &path);
        match job["status"].as_str().unwrap() {
            "validating_files" | "queued" | "running" => Err(job.to_string()),
            _ => Ok(job),
        }
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    let ask = |model: &str| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of Zorblax?"}], "max_tokens": 16, "temperature": 0});
        let (status, reply) = post(&app, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        !ask(&base).contains("Quintara"),
        "the base model already knows"
    );
    let answer = ask(job["fine_tuned_model"].as_str().unwrap());
    assert!(answer.contains("Quintara"), "{answer}");
}
