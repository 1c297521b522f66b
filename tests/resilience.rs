//! The server as a process under faults: `rewind serve` is started as a child on a tiny model,
//! stopped by SIGTERM or killed by SIGKILL while a fine-tuning job trains, and started again
//! on the same data directory (only once the previous process has exited: it holds the data
//! directory's lock).

mod common;

use common::{client, tiny_chatml_model, wait_until, ServeProcess, TINY};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

/// How long a stopped server may take to exit.
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// Starts the server on `data` with `extra` added to its config and waits until it is healthy.
fn start(data: &Path, extra: &str) -> ServeProcess {
    ServeProcess::start(data, tiny_chatml_model(), extra)
}

fn upload_facts(server: &ServeProcess) -> String {
    let file = server.upload(std::fs::read(common::fixture("facts_train.jsonl")).unwrap());
    file["id"].as_str().unwrap().to_string()
}

/// A job of `epochs` epochs of 8 steps (the facts file, batch size 1).
fn create_job(server: &ServeProcess, file: &str, epochs: usize) -> String {
    let (status, job) = server.post(
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file, "hyperparameters": {"n_epochs": epochs, "batch_size": 1}}),
    );
    assert_eq!(status, 200, "{job}");
    job["id"].as_str().unwrap().to_string()
}

/// The job's events, oldest first.
fn events(server: &ServeProcess, id: &str) -> Vec<Value> {
    let page = server.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=10000"));
    let mut events = page["data"].as_array().unwrap().clone();
    events.reverse();
    events
}

/// Steps of the job's metrics events, oldest first.
fn steps(server: &ServeProcess, id: &str) -> Vec<u64> {
    events(server, id)
        .iter()
        .filter(|e| e["type"] == "metrics")
        .filter_map(|e| e["data"]["step"].as_u64())
        .collect()
}

fn wait_for_steps(server: &ServeProcess, id: &str, at_least: usize) -> usize {
    wait_until(Duration::from_secs(60), "too few steps", || {
        let steps = steps(server, id).len();
        (steps >= at_least)
            .then_some(steps)
            .ok_or(steps.to_string())
    })
}

/// SIGTERM while a stream runs and a job trains: the stream ends with a final event, the job
/// stops at the end of its step with its state saved, and the process exits within the bound.
/// Started again, the job continues from the step it had reached: every step is trained exactly
/// once over the two runs (a kill would make it train again the steps since its last
/// checkpoint), and it succeeds.
#[test]
fn sigterm_ends_streams_saves_the_job_and_exits_in_time() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), "");
    let file = upload_facts(&server);
    let id = create_job(&server, &file, 12); // 96 steps
    let stream = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": TINY, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4000, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = BufReader::new(stream);
    wait_for_steps(&server, &id, 3);

    server.signal(libc::SIGTERM);
    // The stream ends: a final error event (503's envelope) or its finish, then nothing more.
    let mut last = None;
    let mut line = String::new();
    while stream.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            last = Some(data.to_string());
        }
        line.clear();
    }
    let last = last.expect("no event");
    if last != "[DONE]" {
        let event: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(event["error"]["code"], "service_unavailable", "{event}");
    }
    let (status, took) = server.exits_within(EXIT_BOUND);
    eprintln!("exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "{status}");

    let server = start(data.path(), "");
    let job = server.finished_job(&id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        steps(&server, &id),
        (1..=96).collect::<Vec<u64>>(),
        "every step trained exactly once, in order"
    );
    let messages: Vec<String> = events(&server, &id)
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    for wanted in [
        "The server is stopping: training stopped with its state saved",
        "resuming from the last checkpoint",
        // The binary counts its heap, so the job measured what its batch needs.
        "Memory: ",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(wanted)),
            "{wanted}: {messages:?}"
        );
    }
}

/// A job during which the process dies (SIGKILL here; an allocation abort or the OOM killer in
/// life) is resumed at each start until `fine_tuning.max_job_attempts` starts have not ended
/// cleanly; the next start fails it with a clear error instead of training it again, and the
/// server stays up.
#[test]
fn a_job_the_server_keeps_dying_during_fails_after_its_attempts() {
    let data = tempfile::tempdir().unwrap();
    let config = "[fine_tuning]\nmax_job_attempts = 2\n";
    let server = start(data.path(), config);
    let file = upload_facts(&server);
    let id = create_job(&server, &file, 40);
    let steps = wait_for_steps(&server, &id, 1);
    server.kill();

    // The second start resumes it, and counts.
    let server = start(data.path(), config);
    wait_for_steps(&server, &id, steps + 1);
    assert_eq!(
        server.get(&format!("/v1/fine_tuning/jobs/{id}"))["status"],
        "running"
    );
    server.kill();

    let server = start(data.path(), config);
    let job = server.finished_job(&id);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "too_many_attempts", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("started 2 time(s)"), "{message}");
    assert!(events(&server, &id)
        .iter()
        .any(|e| e["level"] == "error" && e["message"].as_str() == Some(message)));
    let health = client().get(server.url("/health")).send().unwrap();
    assert_eq!(health.status(), 200);
    let (status, reply) = server.post(
        "/v1/chat/completions",
        &json!({"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{reply}");
    // A new job trains as usual.
    let next = create_job(&server, &file, 1);
    assert_eq!(server.finished_job(&next)["status"], "succeeded");
}

/// A job whose training file went missing while the server was down fails on resume with an
/// error naming the file, and the server stays up.
#[test]
fn a_job_whose_file_vanished_fails_on_resume_and_the_server_stays_up() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), "");
    let file = upload_facts(&server);
    let id = create_job(&server, &file, 40);
    wait_for_steps(&server, &id, 1);
    server.signal(libc::SIGTERM);
    server.exits_within(EXIT_BOUND);
    std::fs::remove_file(data.path().join("files").join(&file)).unwrap();

    let server = start(data.path(), "");
    let job = server.finished_job(&id);
    assert_eq!(job["status"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains(&file), "{message}");
    assert_eq!(
        client().get(server.url("/health")).send().unwrap().status(),
        200
    );
}
