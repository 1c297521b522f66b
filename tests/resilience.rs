//! The server as a process under faults: `rewind serve` is started as a child on a tiny model,
//! stopped by SIGTERM or killed by SIGKILL while a fine-tuning job trains, and started again
//! on the same data directory (only once the previous process has exited: it holds the data
//! directory's lock).

mod common;

use common::wait_until;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TINY: &str = "tiny";
const CHATML: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// How long a stopped server may take to exit.
const EXIT_BOUND: Duration = Duration::from_secs(10);

fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| common::write_tiny_model("chatml", CHATML))
        .1
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rewind serve` as a child process.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Server {
    /// Starts the server on `data` with `extra` appended to its config and waits until healthy.
    fn start(data: &Path, extra: &str) -> Self {
        let port = free_port();
        let config = data.join("config.toml");
        let text = format!(
            "data_dir = {:?}\n{extra}\n[server]\nworkers = 2\nport = {port}\n[[models]]\nid = \"{TINY}\"\nsource = {:?}\n",
            data.to_str().unwrap(),
            tiny_model().to_str().unwrap()
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("server.log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rewind"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait_until(
            Duration::from_secs(60),
            "the server did not start",
            || match client().get(server.url("/health")).send() {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            },
        );
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn get(&self, path: &str) -> Value {
        client().get(self.url(path)).send().unwrap().json().unwrap()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = client().post(self.url(path)).json(body).send().unwrap();
        (res.status().as_u16(), res.json().unwrap_or(Value::Null))
    }

    fn upload_facts(&self) -> String {
        let form = reqwest::blocking::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part(
                "file",
                reqwest::blocking::multipart::Part::bytes(
                    std::fs::read(common::fixture("facts_train.jsonl")).unwrap(),
                )
                .file_name("facts.jsonl"),
            );
        let file: Value = client()
            .post(self.url("/v1/files"))
            .multipart(form)
            .send()
            .unwrap()
            .json()
            .unwrap();
        file["id"].as_str().unwrap().to_string()
    }

    /// A job of `epochs` epochs of 8 steps (the facts file, batch size 1).
    fn create_job(&self, file: &str, epochs: usize) -> String {
        let (status, job) = self.post(
            "/v1/fine_tuning/jobs",
            &json!({"model": TINY, "training_file": file, "hyperparameters": {"n_epochs": epochs, "batch_size": 1}}),
        );
        assert_eq!(status, 200, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/fine_tuning/jobs/{id}"))
    }

    /// The job's events, oldest first.
    fn events(&self, id: &str) -> Vec<Value> {
        let page = self.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=10000"));
        let mut events = page["data"].as_array().unwrap().clone();
        events.reverse();
        events
    }

    /// Steps of the job's metrics events, oldest first.
    fn steps(&self, id: &str) -> Vec<u64> {
        self.events(id)
            .iter()
            .filter(|e| e["type"] == "metrics")
            .filter_map(|e| e["data"]["step"].as_u64())
            .collect()
    }

    fn wait_for_steps(&self, id: &str, at_least: usize) -> usize {
        wait_until(Duration::from_secs(60), "too few steps", || {
            let steps = self.steps(id).len();
            (steps >= at_least)
                .then_some(steps)
                .ok_or(steps.to_string())
        })
    }

    fn finished(&self, id: &str) -> Value {
        wait_until(Duration::from_secs(120), "job not finished", || {
            let job = self.job(id);
            match job["status"].as_str().unwrap() {
                "succeeded" | "failed" | "cancelled" => Ok(job),
                _ => Err(job.to_string()),
            }
        })
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits up to `limit` for the process to exit; returns its status and how long it took.
    fn exits_within(mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
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
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM while a stream runs and a job trains: the stream ends with a final event, the job
/// stops at the end of its step with its state saved, and the process exits within the bound.
/// Started again, the job continues from the step it had reached: every step is trained exactly
/// once over the two runs (a kill would make it train again the steps since its last
/// checkpoint), and it succeeds.
#[test]
fn sigterm_ends_streams_saves_the_job_and_exits_in_time() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), "");
    let file = server.upload_facts();
    let id = server.create_job(&file, 12); // 96 steps
    let stream = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": TINY, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4000, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = BufReader::new(stream);
    server.wait_for_steps(&id, 3);

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

    let server = Server::start(data.path(), "");
    let job = server.finished(&id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        server.steps(&id),
        (1..=96).collect::<Vec<u64>>(),
        "every step trained exactly once, in order"
    );
    let messages: Vec<String> = server
        .events(&id)
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    for wanted in [
        "The server is stopping: training stopped with its state saved",
        "resuming from the last checkpoint",
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
    let server = Server::start(data.path(), config);
    let file = server.upload_facts();
    let id = server.create_job(&file, 40);
    let steps = server.wait_for_steps(&id, 1);
    server.kill();

    // The second start resumes it, and counts.
    let server = Server::start(data.path(), config);
    server.wait_for_steps(&id, steps + 1);
    assert_eq!(server.job(&id)["status"], "running");
    server.kill();

    let server = Server::start(data.path(), config);
    let job = server.finished(&id);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "too_many_attempts", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("started 2 time(s)"), "{message}");
    assert!(server
        .events(&id)
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
    let next = server.create_job(&file, 1);
    assert_eq!(server.finished(&next)["status"], "succeeded");
}

/// A job whose training file went missing while the server was down fails on resume with an
/// error naming the file, and the server stays up.
#[test]
fn a_job_whose_file_vanished_fails_on_resume_and_the_server_stays_up() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), "");
    let file = server.upload_facts();
    let id = server.create_job(&file, 40);
    server.wait_for_steps(&id, 1);
    server.signal(libc::SIGTERM);
    server.exits_within(EXIT_BOUND);
    std::fs::remove_file(data.path().join("files").join(&file)).unwrap();

    let server = Server::start(data.path(), "");
    let job = server.finished(&id);
    assert_eq!(job["status"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains(&file), "{message}");
    assert_eq!(
        client().get(server.url("/health")).send().unwrap().status(),
        200
    );
}
