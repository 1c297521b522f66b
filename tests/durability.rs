//! Durability of the server's state: one process per data directory, and nothing lost when
//! `rewind serve` is killed with SIGKILL while it writes checkpoints. The servers here are real
//! `rewind serve` child processes (so they can be killed, and so a second one is another
//! process) serving a tiny random model (2 layers, d = 64, SmolLM2's tokenizer).

mod common;

use common::{client, tiny_chatml_model, upload_training_file, wait_until, ServeProcess, TINY};
use rewind::model::loader::WeightFormat;
use rewind::settings::{ModelSettings, Settings};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Jobs may start many times here (each kill interrupts one).
const CONFIG: &str = "[fine_tuning]\nmax_job_attempts = 50\n";
/// The trainer and the poller here share two cores; candle's spinning pool would not.
const ONE_CANDLE_THREAD: &[(&str, &str)] = &[("CANDLE_NUM_THREADS", "1")];

/// `rewind serve` on `data`, not waited for.
fn spawn_serve(data: &Path) -> ServeProcess {
    ServeProcess::spawn(data, tiny_chatml_model(), CONFIG, ONE_CANDLE_THREAD)
}

/// `rewind serve` on `data`, healthy.
fn start(data: &Path) -> ServeProcess {
    spawn_serve(data).healthy()
}

fn training_data() -> Vec<u8> {
    std::fs::read(common::fixture("facts_train.jsonl")).unwrap()
}

/// The content of file `file_id` on the server at `base`.
fn content(base: &str, file_id: &str) -> Vec<u8> {
    let res = client()
        .get(format!("{base}/v1/files/{file_id}/content"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().unwrap().to_vec()
}

/// The entries of `dir` whose names start with a dot: temporary or aside leftovers.
fn leftovers(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A second server on a data directory another process serves refuses to start, at once and
/// saying why; the first goes on serving. Once the first has stopped, the directory is free.
#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.data_dir = data.path().to_path_buf();
    settings.models = vec![ModelSettings {
        id: Some(TINY.into()),
        source: tiny_chatml_model().to_str().unwrap().into(),
        scheme: None,
        format: WeightFormat::F32,
    }];
    let first = rewind::api::start(settings.clone()).unwrap();
    let url = first.url();
    wait_until(
        Duration::from_secs(60),
        "the model did not load",
        || match client()
            .get(format!("{url}/health"))
            .send()
            .unwrap()
            .status()
        {
            reqwest::StatusCode::OK => Ok(()),
            status => Err(status.to_string()),
        },
    );
    let file = upload_training_file(&url, training_data());
    let lock = std::fs::read_to_string(data.path().join("rewind.lock")).unwrap();
    assert_eq!(lock.trim(), std::process::id().to_string());

    // Another process on the same directory: it exits with the reason, without serving.
    let started = Instant::now();
    let mut second = spawn_serve(data.path());
    let status = wait_until(
        Duration::from_secs(30),
        "the second server kept running",
        || second.try_wait().ok_or("running".to_string()),
    );
    let log = second.log();
    assert!(!status.success(), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );
    for expected in [
        data.path().display().to_string(),
        format!("pid {}", std::process::id()),
        "shared database server".to_string(),
    ] {
        assert!(log.contains(&expected), "`{expected}` missing from:\n{log}");
    }

    // The first is untouched: it still serves, its state intact, its lock its own.
    assert_eq!(
        client()
            .get(format!("{url}/health"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(content(&url, file["id"].as_str().unwrap()), training_data());
    let line = b"{\"prompt\": \"a\", \"completion\": \"b\"}\n".to_vec();
    let again = upload_training_file(&url, line.clone());
    assert_eq!(content(&url, again["id"].as_str().unwrap()), line);
    let lock = std::fs::read_to_string(data.path().join("rewind.lock")).unwrap();
    assert_eq!(lock.trim(), std::process::id().to_string());

    // Stopped, the first lets go of the directory: a restart in this process and then another
    // process both take it.
    first.stop();
    let restarted = rewind::api::start(settings).unwrap();
    restarted.stop();
    restarted.wait().unwrap();
    let mut other = wait_until(
        Duration::from_secs(20),
        "the directory stayed locked",
        || {
            let mut other = spawn_serve(data.path());
            std::thread::sleep(Duration::from_millis(500));
            match other.try_wait() {
                None => Ok(other),
                Some(status) => Err(format!("exited: {status}")),
            }
        },
    );
    assert!(other.try_wait().is_none());
    drop(other);
}

/// What to wait for before the next SIGKILL: a moment inside a checkpoint's write.
struct KillPoint {
    what: &'static str,
    /// Called on the names in `jobs/<id>/` and in `models/`.
    hit: fn(&[String], &[String]) -> bool,
}

const KILL_POINTS: [KillPoint; 5] = [
    KillPoint {
        what: "while the trainer's checkpoint is written under its temporary name",
        hit: |job, _| job.iter().any(|n| n == ".checkpoint.rewind-tmp"),
    },
    KillPoint {
        what: "while an epoch's checkpoint model is written",
        hit: |_, models| {
            models
                .iter()
                .any(|n| n.starts_with('.') && n.ends_with(".rewind-tmp") && n.contains("-step-"))
        },
    },
    KillPoint {
        what: "while the previous trainer checkpoint is moved aside",
        hit: |job, _| job.iter().any(|n| n == ".checkpoint.rewind-old"),
    },
    KillPoint {
        what: "while anything under models/ is written, replaced or deleted",
        hit: |_, models| models.iter().any(|n| n.starts_with('.')),
    },
    KillPoint {
        what: "right after a trainer checkpoint is in place",
        hit: |job, _| job.iter().any(|n| n == "checkpoint"),
    },
];

/// How long to wait for a kill point before killing anyway (a kill at a random moment).
const GIVE_UP_WAITING: Duration = Duration::from_secs(2);
/// The killed job's epochs and steps (8 an epoch).
const EPOCHS: u64 = 16;
const STEPS: u64 = EPOCHS * 8;

fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A trainer checkpoint directory with all its files.
fn complete_checkpoint(dir: &Path) -> bool {
    ["weights.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// `rewind serve` is killed with SIGKILL five times while a job writes checkpoints (inside the
/// trainer checkpoint's write, a checkpoint model's write, the swap of two checkpoints, ...)
/// and restarted on the same data directory each time. At each kill a complete checkpoint is
/// on disk (under its name or aside) and the upload downloads byte-identical after the restart;
/// in the end the job succeeds having trained every step (none lost more than an epoch's work to
/// a kill), every checkpoint listed is served, the epoch-end checkpoints the job keeps are the
/// last ones, and no temporary or aside entry remains.
#[test]
fn a_server_killed_during_checkpoint_writes_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let models = data.path().join("models");
    let mut server = start(data.path());
    let uploaded = training_data();
    let file = server.upload(uploaded.clone());
    let file_id = file["id"].as_str().unwrap().to_string();
    // 8 examples, batch 1: 8 steps an epoch, a checkpoint at each epoch's end (and every 50
    // steps). Enough epochs that the job outlasts the kills even if no kill point is seen.
    let (status, job) = server.post(
        "/v1/fine_tuning/jobs",
        &json!({"model": TINY, "training_file": file_id, "hyperparameters": {"n_epochs": EPOCHS, "batch_size": 1}}),
    );
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job_dir = data.path().join("jobs").join(&id);
    let job_path = format!("/v1/fine_tuning/jobs/{id}");

    let mut saw_checkpoint = false;
    // Epoch-end checkpoint models a kill caught being written (the trainer's own checkpoint of
    // that step was already saved, so the resumed run must still publish them).
    let mut interrupted_models = std::collections::BTreeSet::new();
    let run = Instant::now();
    for point in &KILL_POINTS {
        let started = Instant::now();
        let mut hit = false;
        while started.elapsed() < GIVE_UP_WAITING {
            let (job_names, model_names) = (names(&job_dir), names(&models));
            saw_checkpoint |= job_names.iter().any(|n| n == "checkpoint");
            if (point.hit)(&job_names, &model_names) {
                hit = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(server); // SIGKILL
                      // Whenever a checkpoint had been published, a complete one is there: under its name, or
                      // aside while its replacement was being renamed in.
        let complete = !saw_checkpoint
            || complete_checkpoint(&job_dir.join("checkpoint"))
            || complete_checkpoint(&job_dir.join(".checkpoint.rewind-old"));
        let found = names(&job_dir);
        let marker = format!("{id}-step-");
        for name in names(&models).iter().filter(|n| n.starts_with('.')) {
            if let Some(rest) = name.split(&marker).nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                interrupted_models.insert(digits.parse::<u64>().unwrap());
            }
        }
        eprintln!(
            "{:>5.1} s: killed {} ({})",
            run.elapsed().as_secs_f64(),
            point.what,
            if hit {
                "hit"
            } else {
                "not seen: killed anyway"
            }
        );

        server = start(data.path());
        assert_eq!(content(&server.url(""), &file_id), uploaded);
        let job = server.get(&job_path);
        assert!(
            ["validating_files", "queued", "running"].contains(&job["status"].as_str().unwrap()),
            "the job is no longer running after a kill (the test needs more epochs if it \
             succeeded): {job}\n{}",
            server.log()
        );
        assert!(
            complete,
            "no complete checkpoint after a kill {}: {found:?}",
            point.what
        );
    }

    // (Leftovers are checked at the end only: right after a restart the resumed job may already
    // be writing under temporary names again.)
    let job = server.finished_job(&id);
    assert_eq!(job["status"], "succeeded", "{job}\n{}", server.log());
    assert_eq!(content(&server.url(""), &file_id), uploaded);

    // Every step trained and recorded; a step trained again after a kill gives the same loss.
    let events = server.get(&format!("{job_path}/events?limit=10000"))["data"]
        .as_array()
        .unwrap()
        .clone();
    let metrics = events.iter().filter(|e| e["type"] == "metrics").count();
    // A kill costs at most the steps since the last checkpoint (one epoch, 8 steps): had a kill
    // ever found no checkpoint, the job would have started over and trained far more.
    assert!(
        metrics as u64 <= STEPS + 8 * KILL_POINTS.len() as u64,
        "{metrics} steps trained for {STEPS}: a kill lost a checkpoint"
    );
    let losses = common::step_losses(&events);
    assert_eq!(losses.len() as u64, STEPS, "every step has metrics");
    for step in &interrupted_models {
        let created = format!("Checkpoint created at step {step}:");
        assert!(
            events
                .iter()
                .any(|e| e["message"].as_str().unwrap().starts_with(&created)),
            "the checkpoint model of step {step}, interrupted by a kill, was never created"
        );
    }
    eprintln!("checkpoint models interrupted and then created: {interrupted_models:?}");

    // The last three epochs' checkpoints are listed, and each is served, as is the final model.
    let checkpoints = server.get(&format!("{job_path}/checkpoints?limit=100"))["data"]
        .as_array()
        .unwrap()
        .clone();
    let steps: Vec<u64> = checkpoints
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [STEPS, STEPS - 8, STEPS - 16]);
    let mut served: Vec<String> = checkpoints
        .iter()
        .map(|c| {
            c["fine_tuned_model_checkpoint"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    served.push(job["fine_tuned_model"].as_str().unwrap().to_string());
    for model in &served {
        let ask = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        wait_until(
            Duration::from_secs(30),
            "a listed model is not served",
            || match server.post("/v1/chat/completions", &ask) {
                (200, _) => Ok(()),
                (status, reply) => Err(format!("{model}: {status} {reply}")),
            },
        );
    }

    // Nothing temporary or aside remains anywhere, and the job's trainer state is gone.
    for dir in [data.path(), &models, &job_dir, &data.path().join("files")] {
        assert!(
            leftovers(dir).is_empty(),
            "{}: {:?}",
            dir.display(),
            leftovers(dir)
        );
    }
    assert!(!job_dir.join("checkpoint").exists());
}
