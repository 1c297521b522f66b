//! The server as a process under faults: `rewind serve` is started as a child on a tiny model,
//! stopped by SIGTERM or killed by SIGKILL while a fine-tuning job trains, and started again
//! on the same data directory (only once the previous process has exited: it holds the data
//! directory's lock); and its memory watched while it receives a 1 GiB upload.

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

/// Bytes of a test upload made on the fly: at offset `i`, byte `i % 8` of a hash of `i / 8`.
/// Reads as a stream of `len` bytes, never held whole.
struct Pattern {
    at: u64,
    len: u64,
}

impl Pattern {
    fn byte(i: u64) -> u8 {
        ((i / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (8 * (i % 8))) as u8
    }
}

impl std::io::Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min((self.len - self.at) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = Self::byte(self.at + i as u64);
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// A field of `/proc/<pid>/status`, in bytes (`VmRSS`, `VmHWM`).
#[cfg(target_os = "linux")]
fn proc_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib << 10
}

/// A 1 GiB upload (made on the fly by the client, sent with its length) is streamed to disk as
/// it arrives: the server's resident memory grows by less than 50 MB while it receives, stores
/// and answers it, and the stored file is the upload, byte for byte, with no temporary left.
#[cfg(target_os = "linux")]
#[test]
fn a_one_gigabyte_upload_is_streamed_to_disk_in_little_memory() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const SIZE: u64 = 1 << 30;
    const MAX_GROWTH: u64 = 50_000_000;
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), "[fine_tuning]\nmax_file_bytes = 2147483648\n");
    let pid = server.pid();
    // The peak from here on: VmHWM reset to the current size (Linux's clear_refs 5), and VmRSS
    // sampled meanwhile in case the reset is not allowed.
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let baseline = proc_bytes(pid, "VmRSS");
    let (stop, sampled) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (stop, sampled) = (stop.clone(), sampled.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sampled.fetch_max(proc_bytes(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = std::time::Instant::now();
    let form = reqwest::blocking::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::blocking::multipart::Part::reader_with_length(
                Pattern { at: 0, len: SIZE },
                SIZE,
            )
            .file_name("big.bin"),
        );
    let res = client()
        .post(server.url("/v1/files"))
        .multipart(form)
        .send()
        .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let status = res.status();
    let file: Value = res.json().unwrap();
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["bytes"], SIZE, "{file}");
    let mut peak = sampled.load(Ordering::Relaxed);
    if reset {
        peak = peak.max(proc_bytes(pid, "VmHWM"));
    }
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "1 GiB upload in {took:.1?}: server RSS {} MB before, peak {} MB, growth {:.1} MB (peak {})",
        baseline / 1_000_000,
        peak / 1_000_000,
        growth as f64 / 1e6,
        if reset { "VmHWM and sampled VmRSS" } else { "sampled VmRSS" },
    );
    assert!(
        growth < MAX_GROWTH,
        "the server grew by {growth} bytes receiving a 1 GiB upload"
    );

    // Stored whole under its id, and nothing else in the files area.
    let files = data.path().join("files");
    let id = file["id"].as_str().unwrap();
    let names: Vec<String> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [id]);
    let mut stored =
        BufReader::with_capacity(1 << 20, std::fs::File::open(files.join(id)).unwrap());
    let mut at = 0u64;
    loop {
        let chunk = stored.fill_buf().unwrap();
        if chunk.is_empty() {
            break;
        }
        if let Some(i) = chunk
            .iter()
            .enumerate()
            .position(|(i, &b)| b != Pattern::byte(at + i as u64))
        {
            panic!("the stored file differs at byte {}", at + i as u64);
        }
        let n = chunk.len();
        at += n as u64;
        stored.consume(n);
    }
    assert_eq!(at, SIZE);
}
