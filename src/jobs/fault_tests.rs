//! Fault isolation of the runner, with faults injected where no real input reaches: a panic
//! while a job trains fails that job (with the panic's message) and the runner trains the next;
//! a runner thread that died turns `/health` to 503.

use crate::engine::fault_tests::{client, post, spawn, wait_until, App};
use crate::jobs::FineTuning;
use serde_json::{json, Value};
use std::time::Duration;

/// Jobs with this suffix panic at their second step.
pub(crate) const PANIC_SUFFIX: &str = "inject-panic";
/// A job with this suffix panics the runner thread itself, outside the region that catches a
/// job's panic.
const KILL_SUFFIX: &str = "kill-runner";

/// Whether the runner is to die on job `id` (see [`KILL_SUFFIX`]).
pub(crate) fn kills_runner(service: &FineTuning, id: &str) -> bool {
    service
        .store
        .job(id)
        .ok()
        .flatten()
        .is_some_and(|j| j.suffix.as_deref() == Some(KILL_SUFFIX))
}

fn upload_facts(app: &App) -> String {
    let data = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/facts_train.jsonl"),
    )
    .unwrap();
    let form = reqwest::blocking::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::blocking::multipart::Part::bytes(data).file_name("facts.jsonl"),
        );
    let file: Value = client()
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap();
    file["id"].as_str().unwrap().to_string()
}

fn create_job(app: &App, model: &str, file: &str, suffix: &str) -> String {
    let (status, job) = post(
        app,
        "/v1/fine_tuning/jobs",
        &json!({"model": model, "training_file": file, "suffix": suffix,
                "hyperparameters": {"n_epochs": 1, "batch_size": 1}}),
    );
    assert_eq!(status, 200, "{job}");
    job["id"].as_str().unwrap().to_string()
}

fn get(app: &App, path: &str) -> Value {
    client().get(app.url(path)).send().unwrap().json().unwrap()
}

fn finished(app: &App, id: &str) -> Value {
    wait_until(Duration::from_secs(120), "job not finished", || {
        let job = get(app, &format!("/v1/fine_tuning/jobs/{id}"));
        match job["status"].as_str().unwrap() {
            "succeeded" | "failed" | "cancelled" => Ok(job),
            _ => Err(job.to_string()),
        }
    })
}

#[test]
fn a_panic_while_training_fails_the_job_and_the_runner_goes_on() {
    let model = "fault-train";
    let app = spawn(&[model], |_| {});
    let file = upload_facts(&app);
    let failing = create_job(&app, model, &file, PANIC_SUFFIX);
    let next = create_job(&app, model, &file, "after-the-panic");

    let job = finished(&app, &failing);
    assert_eq!(job["status"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the trainer panicked: injected panic at step 2"),
        "{job}"
    );
    let events = get(
        &app,
        &format!("/v1/fine_tuning/jobs/{failing}/events?limit=100"),
    );
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["level"] == "error"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("injected panic at step 2")),
        "{events}"
    );

    let job = finished(&app, &next);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        client().get(app.url("/health")).send().unwrap().status(),
        200
    );
}

#[test]
fn health_reports_a_dead_runner_thread() {
    let model = "fault-dead-runner";
    let app = spawn(&[model], |_| {});
    let file = upload_facts(&app);
    create_job(&app, model, &file, KILL_SUFFIX);
    let body = wait_until(Duration::from_secs(30), "health still 200", || {
        let res = client().get(app.url("/health")).send().unwrap();
        let status = res.status().as_u16();
        let retry_after = res.headers().get("retry-after").is_some();
        let body: Value = res.json().unwrap();
        (status == 503 && retry_after)
            .then_some(body.clone())
            .ok_or(format!("{status} {body}"))
    });
    assert_eq!(body["status"], "fine_tuning_stopped", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    // Inference is unaffected.
    let (status, reply) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{reply}");
}
