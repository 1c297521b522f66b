//! The fine-tuning job lifecycle: creation and file validation, a FIFO queue served by one
//! runner thread ([`runner`]), events, cancellation, and resuming after a restart.
//!
//! Status flow: `validating_files -> queued -> running -> succeeded | failed | cancelled`.
//! Every change goes through [`FineTuning::update`], which re-reads the record under one lock, so
//! a cancel from the HTTP side and the runner's progress never overwrite each other.
//!
//! Faults: a job whose trainer fails or panics ends `failed` with the message, and the runner
//! goes on with the next one. Each start of a trainer is counted in the job's record before it
//! trains (`attempts`), and given back when the trainer stops cleanly, so a job during which the
//! process keeps dying (an allocation abort, the OOM killer) is failed after
//! `fine_tuning.max_job_attempts` starts instead of crash-looping the server at every restart.
//!
//! Shutdown: [`FineTuning::shutdown`] stops the running job at its next step with its state
//! saved; it stays `running` and resumes from that step when the server starts again.
//!
//! Device sharing: the runner trains on its own thread, on the device named by
//! `server.device`, while the engine thread keeps serving. On CPU both draw on the same cores
//! (candle's thread pool), so inference slows down while a job trains; on a GPU they share its
//! memory and queue.

#[cfg(test)]
mod fault_tests;
pub mod report;
pub mod runner;

use crate::engine::registry::ModelSpec;
use crate::engine::{unix_now, Engine};
use crate::settings::Settings;
use crate::store::{DataDirLock, EventRecord, JobError, JobRecord, Store};
use crate::train::data::{parse_jsonl, Example};
use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The service shared by the HTTP handlers and the runner.
pub struct FineTuning {
    pub store: Arc<Store>,
    pub engine: Engine,
    pub settings: Arc<Settings>,
    queue: Mutex<mpsc::Sender<String>>,
    /// What requests tell the trainers of queued and running jobs.
    controls: Mutex<HashMap<String, Arc<TrainerControl>>>,
    /// Serialises read-modify-write of job records.
    updates: Mutex<()>,
    /// The data directory is this service's while it lives (the runner writes into it until the
    /// last handle goes): dropping the service releases it.
    _data_dir: DataDirLock,
    /// Cleared when the runner thread ends, whether it returned or panicked.
    runner_alive: Arc<AtomicBool>,
    /// The runner is working on a job (set before it checks for a shutdown).
    runner_busy: AtomicBool,
    /// When [`FineTuning::shutdown`] was called.
    shutdown_at: Mutex<Option<Instant>>,
}

/// Why a job could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no fine-tuning job `{0}`")]
    NotFound(String),
    #[error("the job is {status}; only {allowed} jobs can be {action}")]
    WrongState {
        status: String,
        allowed: &'static str,
        action: &'static str,
    },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// What pause, resume and cancel requests tell a job's trainer, and whether one is training it.
#[derive(Default)]
pub struct TrainerControl {
    /// Stop at the next step, saving the trainer's state first.
    stop: AtomicBool,
    /// A trainer runs the job and has not decided to stop.
    training: AtomicBool,
}

impl TrainerControl {
    /// A trainer takes the job (in the same update that sets it `running`).
    fn start(&self) {
        self.training.store(true, Ordering::Relaxed);
    }

    /// The trainer has returned.
    fn finish(&self) {
        self.training.store(false, Ordering::Relaxed);
    }
}

/// A status change a request asks for: from which statuses, to which, and what it is called.
struct Transition {
    from: &'static [&'static str],
    allowed: &'static str,
    to: &'static str,
    /// Where the job goes instead while a trainer runs it (a resume that reaches the trainer
    /// before it stopped for the pause leaves it training).
    to_while_training: &'static str,
    action: &'static str,
    message: &'static str,
    /// The trainer's stop flag once the job has moved.
    stop: bool,
}

impl FineTuning {
    /// Stops serving fine-tuned model `id` and deletes its weights, which live under the data
    /// directory's `models/` (nothing outside it is ever removed). Returns its spec.
    pub fn delete_model(&self, id: &str) -> Result<Option<ModelSpec>> {
        let removed = self.engine.remove_model(id)?;
        if let Some(spec) = &removed {
            let root = self.settings.data_dir.join("models");
            let dir = Path::new(&spec.source);
            if dir.starts_with(&root) && dir != root {
                // Gone whole or not at all, even if the process dies midway.
                crate::durable::remove_dir(dir)
                    .map_err(|e| anyhow!("deleting {}: {e:#}", dir.display()))?;
            }
        }
        Ok(removed)
    }

    /// Opens the store, starts the runner and re-queues the jobs an earlier run left unfinished
    /// (a running one resumes from its last checkpoint). `data_dir` is the lock on
    /// `settings.data_dir` ([`crate::store::open_data_dir`]), held for the service's life.
    pub fn start(
        settings: Arc<Settings>,
        engine: Engine,
        data_dir: DataDirLock,
    ) -> Result<Arc<Self>> {
        let store = Arc::new(Store::open(&settings.data_dir)?);
        let (tx, rx) = mpsc::channel();
        let service = Arc::new(Self {
            store,
            engine,
            settings,
            queue: Mutex::new(tx),
            controls: Mutex::new(HashMap::new()),
            updates: Mutex::new(()),
            _data_dir: data_dir,
            runner_alive: Arc::new(AtomicBool::new(true)),
            runner_busy: AtomicBool::new(false),
            shutdown_at: Mutex::new(None),
        });
        let runner = Arc::downgrade(&service);
        let guard = crate::engine::AliveGuard(service.runner_alive.clone());
        std::thread::Builder::new()
            .name("rewind-fine-tuning".into())
            .spawn(move || {
                let _guard = guard;
                runner::run(runner, rx)
            })?;
        for job in service.store.unfinished_jobs()? {
            let note = if job.status == "running" {
                "Server restarted; resuming from the last checkpoint."
            } else {
                "Server restarted; job re-queued."
            };
            service.event(&job.id, "info", note, None)?;
            if job.status == "validating_files" {
                service.validate_and_queue(&job.id)?;
            } else {
                service.enqueue(&job.id);
            }
        }
        Ok(service)
    }

    /// Whether the runner thread is running (false once it has ended or panicked outside the
    /// region that catches a job's panic).
    pub fn is_alive(&self) -> bool {
        self.runner_alive.load(Ordering::Acquire)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The server is stopping: the running job stops at its next step with its state saved
    /// (it stays `running`, and resumes from there at the next start); no other job starts.
    pub fn shutdown(&self) {
        let mut at = self.shutdown_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_none() {
            *at = Some(Instant::now());
        }
    }

    /// Waits until the runner has stopped working (after [`FineTuning::shutdown`]), for at most
    /// `grace` since the shutdown began; returns whether it stopped. A job still training then
    /// resumes from its last checkpoint at the next start, as after a crash.
    pub fn wait_for_runner(&self, grace: Duration) -> bool {
        let Some(since) = *self.shutdown_at.lock().unwrap_or_else(|e| e.into_inner()) else {
            return !self.runner_busy.load(Ordering::SeqCst);
        };
        loop {
            if !self.runner_busy.load(Ordering::SeqCst) || !self.is_alive() {
                return true;
            }
            if since.elapsed() >= grace {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Records a `message` event, or a `metrics` one when `data` is given.
    pub fn event(
        &self,
        job_id: &str,
        level: &str,
        message: &str,
        data: Option<Value>,
    ) -> Result<()> {
        let kind = if data.is_some() { "metrics" } else { "message" };
        self.store.insert_event(&EventRecord {
            id: crate::store::new_id("ftevent-"),
            job_id: job_id.to_string(),
            created_at: unix_now(),
            level: level.into(),
            message: message.into(),
            kind: kind.into(),
            data: data.unwrap_or_else(|| json!({})),
        })
    }

    /// Applies `change` to the freshly read job record, stores it and returns it. Callers that
    /// must not overwrite a terminal status (a cancel that raced them) check `is_terminal` inside
    /// `change`.
    /// The server is exiting before the running job's trainer reached the end of its step (one
    /// step outlasted the stop's grace): that start ended in a shutdown, not a crash, so it does
    /// not count against the job's `fine_tuning.max_job_attempts`.
    pub fn forgive_interrupted_attempts(&self) -> Result<()> {
        for job in self
            .store
            .unfinished_jobs()?
            .iter()
            .filter(|j| j.status == "running")
        {
            self.update(&job.id, |j| j.attempts = j.attempts.saturating_sub(1))?;
        }
        Ok(())
    }

    pub fn update(&self, id: &str, change: impl FnOnce(&mut JobRecord)) -> Result<JobRecord> {
        let _guard = self.updates.lock().unwrap_or_else(|e| e.into_inner());
        let mut job = self
            .store
            .job(id)?
            .ok_or_else(|| anyhow!("no fine-tuning job `{id}`"))?;
        change(&mut job);
        job.updated_at = unix_now();
        self.store.update_job(&job)?;
        Ok(job)
    }

    /// Stores a new job (status `validating_files`), validates its files and queues it.
    pub fn create(&self, job: JobRecord) -> Result<JobRecord> {
        self.store.insert_job(&job)?;
        self.event(
            &job.id,
            "info",
            &format!("Created fine-tuning job: {}", job.id),
            None,
        )?;
        self.validate_and_queue(&job.id)
    }

    fn validate_and_queue(&self, id: &str) -> Result<JobRecord> {
        let job = self
            .store
            .job(id)?
            .ok_or_else(|| anyhow!("no fine-tuning job `{id}`"))?;
        let mut problem = None;
        for (param, file) in [
            ("training_file", Some(&job.training_file)),
            ("validation_file", job.validation_file.as_ref()),
        ] {
            let Some(file) = file else { continue };
            if let Err(message) = self.load_examples(file) {
                problem = Some(JobError {
                    code: "invalid_file".into(),
                    message,
                    param: Some(param.into()),
                });
                break;
            }
        }
        if let Some(error) = problem {
            self.event(
                id,
                "error",
                &format!("File validation failed: {}", error.message),
                None,
            )?;
            return self.update(id, |j| {
                j.status = "failed".into();
                j.finished_at = Some(unix_now());
                j.error = Some(error);
            });
        }
        self.event(id, "info", "Validated training file", None)?;
        let job = self.update(id, |j| {
            if j.status == "validating_files" {
                j.status = "queued".into();
            }
        })?;
        if job.status == "queued" {
            self.event(
                id,
                "info",
                "Job enqueued. Waiting for jobs ahead to complete.",
                None,
            )?;
            self.enqueue(id);
        }
        Ok(job)
    }

    fn enqueue(&self, id: &str) {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default();
        // The runner holds the receiver for the service's whole life.
        let _ = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(id.to_string());
    }

    /// Reads and validates a stored JSONL file; the error names the first bad lines.
    pub fn load_examples(&self, file_id: &str) -> std::result::Result<Vec<Example>, String> {
        let bytes = self
            .store
            .read_file(file_id)
            .map_err(|e| format!("file `{file_id}` cannot be read: {e:#}"))?;
        let text =
            String::from_utf8(bytes).map_err(|_| format!("file `{file_id}` is not UTF-8"))?;
        parse_jsonl(&text).map_err(|errors| {
            let shown: Vec<String> = errors.iter().take(3).map(ToString::to_string).collect();
            format!("file `{file_id}`: {}", shown.join("; "))
        })
    }

    pub fn control(&self, id: &str) -> Arc<TrainerControl> {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    pub fn forget(&self, id: &str) {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Pauses a queued or running job: it is `paused` at once, and a running trainer saves a
    /// checkpoint and stops at its next step.
    pub fn pause(&self, id: &str) -> std::result::Result<JobRecord, StateError> {
        let pause = Transition {
            from: &["queued", "running"],
            allowed: "queued or running",
            to: "paused",
            to_while_training: "paused",
            action: "paused",
            message: "Job paused.",
            stop: true,
        };
        Ok(self.transition(id, pause)?.0)
    }

    /// Resumes a paused job: re-queued, it continues from the checkpoint the pause saved; a
    /// trainer that had not yet stopped for the pause simply trains on.
    pub fn resume(&self, id: &str) -> std::result::Result<JobRecord, StateError> {
        let resume = Transition {
            from: &["paused"],
            allowed: "paused",
            to: "queued",
            to_while_training: "running",
            action: "resumed",
            message: "Job resumed.",
            stop: false,
        };
        let (job, _) = self.transition(id, resume)?;
        if job.status == "queued" {
            self.enqueue(id);
        }
        Ok(job)
    }

    /// Cancels a job that has not finished: it is `cancelled` at once, and a running trainer
    /// stops at its next step.
    pub fn cancel(&self, id: &str) -> std::result::Result<JobRecord, StateError> {
        let cancel = Transition {
            from: &["validating_files", "queued", "running", "paused"],
            allowed: "validating, queued, running or paused",
            to: "cancelled",
            to_while_training: "cancelled",
            action: "cancelled",
            message: "Job cancelled.",
            stop: true,
        };
        let (job, previous) = self.transition(id, cancel)?;
        // A running trainer holds its own handle on the control.
        self.forget(id);
        if previous == "paused" {
            // No trainer will resume from the state the pause saved.
            let state = self
                .settings
                .data_dir
                .join("jobs")
                .join(id)
                .join("checkpoint");
            let _ = crate::durable::remove_dir(&state);
        }
        Ok(job)
    }

    /// Whether the trainer holding `control` stops now. The decision is taken under the status
    /// lock, so a resume racing a pause either reaches the trainer before it decides (the job
    /// trains on, `running`) or finds it stopped (the job is queued to continue from its
    /// checkpoint).
    pub(crate) fn trainer_stops(&self, control: &TrainerControl) -> bool {
        if self.is_shutting_down() {
            return true;
        }
        if !control.stop.load(Ordering::Relaxed) {
            return false;
        }
        let _guard = self.updates.lock().unwrap_or_else(|e| e.into_inner());
        let stops = control.stop.load(Ordering::Relaxed);
        if stops {
            control.training.store(false, Ordering::Relaxed);
        }
        stops
    }

    /// Applies `t` if the job's status is one it starts from, setting the trainer's stop flag
    /// under the same lock as the status (so racing requests leave the two consistent).
    /// Returns the job and its previous status.
    fn transition(
        &self,
        id: &str,
        t: Transition,
    ) -> std::result::Result<(JobRecord, String), StateError> {
        let control = self.control(id);
        let mut previous = String::new();
        let mut refused = None;
        let result = self.update(id, |j| {
            if t.from.contains(&j.status.as_str()) {
                let to = if control.training.load(Ordering::Relaxed) {
                    t.to_while_training
                } else {
                    t.to
                };
                previous = std::mem::replace(&mut j.status, to.into());
                control.stop.store(t.stop, Ordering::Relaxed);
                if j.is_terminal() {
                    j.finished_at = Some(unix_now());
                }
            } else {
                refused = Some(j.status.clone());
            }
        });
        let job = match result {
            Ok(job) => job,
            Err(_) if self.store.job(id)?.is_none() => {
                return Err(StateError::NotFound(id.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(status) = refused {
            return Err(StateError::WrongState {
                status,
                allowed: t.allowed,
                action: t.action,
            });
        }
        self.event(id, "info", t.message, None)?;
        Ok((job, previous))
    }
}
