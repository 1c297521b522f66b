//! The runner thread: takes queued jobs one at a time, trains them with the reversible engine,
//! saves and registers the model, and attaches the result files.
//!
//! A job trains with a checkpoint directory under `<data_dir>/jobs/<id>/checkpoint`, so a job
//! that was running when the server died resumes from its last checkpoint (the trainer saves one
//! every 50 steps and at the end of each epoch) and reproduces the same loss curve.
//!
//! A panic while a job trains is caught here: the job fails with the panic's message and the
//! runner goes on with the next job. Before each start the job's `attempts` count is stored, so
//! a start during which the process dies still counts; once `fine_tuning.max_job_attempts`
//! starts have not ended cleanly, the job is failed instead of started again.

use crate::engine::registry::ModelSpec;
use crate::engine::unix_now;
use crate::jobs::{report, FineTuning, TrainerControl};
use crate::model::decoder::Model;
use crate::model::loader::save::save_model;
use crate::model::loader::{self, LoadOptions, WeightFormat};
use crate::model::reversible::ReversibleConfig;
use crate::store::{CheckpointRecord, FileRecord, JobError, JobRecord};
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::TextTokenizer;
use crate::train::backward::Strategy;
use crate::train::data::{fit_length, tokenize, Example, Overflow, TokenizedExample};
use crate::train::exact::{self, FixedPoint};
use crate::train::memory_fit::{BatchRule, MemoryFit};
use crate::train::optimizer::AdamWConfig;
use crate::train::trainer::{self, Observer, StepMetrics, TrainConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};

/// Learning rate a multiplier of 1 stands for (the `rewind train` default).
const BASE_LEARNING_RATE: f64 = 1e-4;
/// LoRA adapters start at zero and train few weights: they take a larger step.
const BASE_LORA_LEARNING_RATE: f64 = 1e-3;

pub(crate) fn run(service: Weak<FineTuning>, queue: mpsc::Receiver<String>) {
    while let Ok(id) = queue.recv() {
        let Some(service) = service.upgrade() else {
            return;
        };
        // Busy before the shutdown check, which `FineTuning::wait_for_runner` pairs with: either
        // the shutdown sees the runner busy and waits, or the runner sees the shutdown.
        service.runner_busy.store(true, Ordering::SeqCst);
        if service.is_shutting_down() {
            // Left queued or running in the store: the next start takes it up.
            service.runner_busy.store(false, Ordering::SeqCst);
            continue;
        }
        #[cfg(test)]
        if super::fault_tests::kills_runner(&service, &id) {
            panic!("injected panic on the runner thread");
        }
        let outcome = match catch_unwind(AssertUnwindSafe(|| run_one(&service, &id))) {
            Ok(result) => result.map_err(|e| format!("{e:#}")),
            Err(panic) => Err(format!(
                "the trainer panicked: {}",
                crate::engine::panic_message(panic.as_ref())
            )),
        };
        if let Err(message) = outcome {
            tracing::error!(job = %id, "fine-tuning failed: {message}");
            let _ = service.event(
                &id,
                "error",
                &format!("Fine-tuning failed: {message}"),
                None,
            );
            let _ = service.update(&id, |j| {
                if !j.is_terminal() {
                    j.status = "failed".into();
                    j.finished_at = Some(unix_now());
                    j.error = Some(JobError {
                        code: "training_failed".into(),
                        message,
                        param: None,
                    });
                }
            });
        }
        service.forget(&id);
        // Training's working set is not needed while the server only serves.
        crate::memory::release_free_heap();
        service.runner_busy.store(false, Ordering::SeqCst);
    }
}

/// The cookbook's `n_epochs = "auto"` rule: about 3 epochs, at least ~100 example passes, at most
/// ~25,000 (see docs: OpenAI fine-tuning data preparation).
pub fn auto_epochs(examples: usize) -> usize {
    let n = examples.max(1);
    if n * 3 < 100 {
        (100 / n).min(25)
    } else if n * 3 > 25_000 {
        (25_000 / n).max(1)
    } else {
        3
    }
}

/// "auto" or a number.
fn resolve(value: &Value, auto: f64) -> f64 {
    value.as_f64().unwrap_or(auto)
}

fn run_one(service: &FineTuning, id: &str) -> Result<()> {
    let mut started = false;
    let mut exhausted = None;
    let max_attempts = service.settings.fine_tuning.max_job_attempts;
    let control = service.control(id);
    // Counted, and stored, before anything is trained: a start the process dies during counts.
    let job = service.update(id, |j| {
        if j.status == "queued" || j.status == "running" {
            if j.attempts as usize >= max_attempts {
                let message = format!(
                    "The job's trainer was started {} time(s) and the server stopped or crashed \
                     during each (for example out of memory), so it is not started again \
                     (fine_tuning.max_job_attempts = {max_attempts}).",
                    j.attempts
                );
                j.status = "failed".into();
                j.finished_at = Some(unix_now());
                j.error = Some(JobError {
                    code: "too_many_attempts".into(),
                    message: message.clone(),
                    param: None,
                });
                exhausted = Some(message);
                return;
            }
            started = j.status == "queued";
            j.status = "running".into();
            j.attempts += 1;
            control.start();
        }
    })?;
    if let Some(message) = exhausted {
        tracing::error!(job = %id, "{message}");
        service.event(id, "error", &message, None)?;
        return Ok(());
    }
    if job.status != "running" {
        return Ok(()); // cancelled or paused while queued
    }
    // `finish` however the trainer ends, a panic included.
    struct Finish<'a>(&'a TrainerControl);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.finish();
        }
    }
    let _finish = Finish(&control);
    train_job(service, id, job, &control, started)?;
    // The trainer ended cleanly (finished, paused, cancelled or stopped for a shutdown): this
    // start does not count against the job.
    let job = service.update(id, |j| j.attempts = j.attempts.saturating_sub(1))?;
    if job.status == "running" && service.is_shutting_down() {
        service.event(
            id,
            "info",
            "The server is stopping: training stopped with its state saved; it continues from there when the server starts again.",
            None,
        )?;
    }
    Ok(())
}

fn train_job(
    service: &FineTuning,
    id: &str,
    job: JobRecord,
    control: &Arc<TrainerControl>,
    started: bool,
) -> Result<()> {
    let job_dir = service.settings.data_dir.join("jobs").join(id);
    if started {
        let message = if job_dir.join("checkpoint").join("state.json").exists() {
            "Fine-tuning job continues from its checkpoint"
        } else {
            "Fine-tuning job started"
        };
        service.event(id, "info", message, None)?;
    }

    // The base model, as the server loads it.
    let spec = service
        .engine
        .registry()
        .spec(&job.model)
        .ok_or_else(|| anyhow!("the model `{}` is no longer served", job.model))?;
    let path = crate::provision::resolve(Some(&spec.source))?;
    let scheme = job.rewind.scheme.clone().or(spec.scheme.clone());
    let reversible = scheme.as_deref().map(ReversibleConfig::parse).transpose()?;
    let device = crate::settings::parse_device(&service.settings.server.device)?.open()?;
    let loaded = loader::load(
        &path,
        &LoadOptions {
            format: WeightFormat::F32,
            device,
            reversible,
        },
    )?;
    let mut model = loaded.model;

    let examples = |file: &str| service.load_examples(file).map_err(|e| anyhow!(e));
    let max_len = service.settings.fine_tuning.max_seq_len;
    let mut truncated = 0;
    let mut tokenized = |list: Vec<Example>| -> Result<Vec<TokenizedExample>> {
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let t = tokenize(e, &loaded.chat_template, &loaded.tokenizer)?;
                truncated += usize::from(t.ids.len() > max_len);
                fit_length(t, max_len, Overflow::Truncate, i)
            })
            .collect()
    };
    let train_set = tokenized(examples(&job.training_file)?)?;
    let val_set = match &job.validation_file {
        Some(file) => tokenized(examples(file)?)?,
        None => Vec::new(),
    };
    if truncated > 0 {
        service.event(
            id,
            "warn",
            &format!("{truncated} example(s) were longer than {max_len} tokens and were truncated"),
            None,
        )?;
    }

    // Hyperparameters: "auto" resolved and written back to the job.
    // "auto" stays within the bounds a request may ask for.
    let hp = &job.hyperparameters;
    let bounds = &service.settings.fine_tuning;
    let epochs = resolve(
        &hp["n_epochs"],
        auto_epochs(train_set.len()).min(bounds.max_n_epochs) as f64,
    ) as usize;
    let batch_size = resolve(
        &hp["batch_size"],
        (train_set.len() as f64 * 0.002)
            .ceil()
            .clamp(1.0, bounds.max_batch_size as f64),
    ) as usize;
    let multiplier = resolve(&hp["learning_rate_multiplier"], 1.0);
    let lora_rank = job.rewind.lora_rank.unwrap_or(0);
    let lr = multiplier
        * if lora_rank > 0 {
            BASE_LORA_LEARNING_RATE
        } else {
            BASE_LEARNING_RATE
        };
    let strategy = match job.rewind.strategy.as_deref() {
        Some(s) => serde_json::from_value::<Strategy>(json!(s))
            .map_err(|_| anyhow!("unknown strategy `{s}`"))?,
        None if model.reversible.is_reversible() => Strategy::Reversible,
        None => Strategy::Checkpoint,
    };
    if strategy == Strategy::Reversible && !model.reversible.is_reversible() {
        bail!("strategy `reversible` needs a reversible scheme (set `rewind.scheme`, e.g. `midpoint`); `{}` is not", model.reversible.label());
    }
    let mut train_only = Vec::new();
    if lora_rank > 0 {
        model.densify()?;
        let targets: Vec<String> = crate::model::block::PROJECTION_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect();
        model.add_lora(
            lora_rank,
            job.rewind.lora_alpha.unwrap_or(16.0),
            &targets,
            job.seed,
        )?;
        train_only.push("lora_".into());
    }
    let exact = (strategy == Strategy::Reversible)
        .then(|| {
            exact::unsupported_reason(&model)
                .is_none()
                .then(FixedPoint::default)
        })
        .flatten();
    let config = TrainConfig {
        strategy,
        exact,
        epochs,
        batch_size,
        // An asked-for batch must fit; "auto" becomes the largest that does (up to its rule).
        batch_rule: Some(if hp["batch_size"].is_number() {
            BatchRule::Required
        } else {
            BatchRule::AtMost
        }),
        optimizer: AdamWConfig {
            lr,
            ..Default::default()
        },
        seed: job.seed,
        train_only,
        checkpoint_dir: Some(job_dir.join("checkpoint")),
        ..Default::default()
    };
    let resolved = json!({"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier": multiplier});
    service.update(id, |j| j.hyperparameters = resolved)?;
    service.event(
        id,
        "info",
        &format!(
            "Training {} examples for {epochs} epoch(s), batch size {batch_size}, strategy {}, scheme {}{}",
            train_set.len(),
            json!(strategy).as_str().unwrap_or("?"),
            model.reversible.label(),
            if lora_rank > 0 { format!(", LoRA rank {lora_rank}") } else { String::new() }
        ),
        None,
    )?;

    let pad = loaded.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let mut observer = JobObserver {
        service,
        job: &job,
        control: control.clone(),
        epochs,
        // Known before the first step, for the checkpoint a resumed run announces first.
        steps_per_epoch: train_set.len().div_ceil(batch_size.max(1)).max(1),
        last: None,
        tokenizer: &loaded.tokenizer,
        template: &loaded.chat_template,
    };
    let outcome = trainer::train(
        model,
        &train_set,
        &val_set,
        pad,
        &config,
        None,
        &mut observer,
    )?;
    if outcome.cancelled {
        // `cancel` or `pause` already set the status and wrote the event. A pause keeps the
        // saved state for its resume; a cancel has no use for it.
        if service
            .store
            .job(id)?
            .is_some_and(|j| j.status == "cancelled")
        {
            let _ = std::fs::remove_dir_all(job_dir.join("checkpoint"));
        }
        return Ok(());
    }

    // Save, register and serve the model.
    let short: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(8)
        .collect();
    let model_id = format!(
        "ft:{}:rewind:{}:{short}",
        job.model,
        job.suffix.clone().unwrap_or_default()
    );
    publish_model(
        service,
        &outcome.model,
        &loaded.tokenizer,
        &loaded.chat_template,
        &model_id,
        id,
    )?;
    drop(outcome);
    service.event(
        id,
        "info",
        &format!("New fine-tuned model created: {model_id}"),
        None,
    )?;

    // Result files, built from the recorded metrics events (a resumed job's included).
    let events = service.store.events_since(id, 0)?;
    let mut results = vec![("step_metrics.csv", report::metrics_csv(&events))];
    // A plot that cannot be drawn costs the job its plot, not its success.
    match report::loss_svg(&events) {
        Ok(svg) => results.push(("loss.svg", svg)),
        Err(e) => tracing::warn!(job = id, "the loss plot could not be drawn: {e:#}"),
    }
    let mut result_files = Vec::new();
    for (name, content) in results {
        let record = FileRecord {
            id: crate::store::new_id("file-"),
            bytes: content.len() as u64,
            created_at: unix_now(),
            filename: format!("{id}_{name}"),
            purpose: "fine-tune-results".into(),
        };
        service.store.insert_file(&record, content.as_bytes())?;
        result_files.push(record.id);
    }
    service.event(
        id,
        "info",
        &format!("Uploaded result files: {}", result_files.join(", ")),
        None,
    )?;
    let trained_tokens = outcome_tokens(&events);
    let job = service.update(id, |j| {
        if !j.is_terminal() {
            j.status = "succeeded".into();
            j.fine_tuned_model = Some(model_id.clone());
            j.finished_at = Some(unix_now());
            j.trained_tokens = Some(trained_tokens);
            j.result_files = result_files;
        }
    })?;
    if job.status == "succeeded" {
        service.event(id, "info", "The job has successfully completed", None)?;
    } else {
        // Cancelled while the model was being saved: it is neither served nor kept.
        let _ = service.delete_model(&model_id);
    }
    let _ = std::fs::remove_dir_all(job_dir.join("checkpoint"));
    Ok(())
}

/// Saves `model` under the data directory's `models/{dir_name}` and serves it as `model_id`
/// (the registry keeps it across restarts).
fn publish_model(
    service: &FineTuning,
    model: &Model,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    model_id: &str,
    dir_name: &str,
) -> Result<()> {
    let model_dir = service.settings.data_dir.join("models").join(dir_name);
    save_model(
        model,
        tokenizer,
        template,
        &model_dir,
        candle_core::DType::F32,
    )?;
    let spec = ModelSpec {
        id: model_id.to_string(),
        source: path_string(&model_dir)?,
        scheme: None,
        format: WeightFormat::F32,
        created: unix_now(),
        owned_by: "rewind".into(),
    };
    let loaded = service
        .engine
        .add_model(spec)?
        .blocking_recv()
        .map_err(|_| anyhow!("the engine stopped"))?
        .map_err(|e| anyhow!("loading {model_id}: {e}"));
    if loaded.is_err() {
        // Not left registered (and reloaded at every start) as a model that cannot load.
        let _ = service.delete_model(model_id);
    }
    loaded
}

/// Epoch-end checkpoint models a job keeps (older ones are deleted).
pub const KEPT_CHECKPOINTS: usize = 3;

/// The folder of a checkpoint model under `models/`, beside the job's final model.
fn checkpoint_dir_name(job_id: &str, step: usize) -> String {
    format!("{job_id}-step-{step}")
}

fn outcome_tokens(events: &[crate::store::EventRecord]) -> u64 {
    events
        .iter()
        .filter_map(|e| e.data.get("trained_tokens").and_then(Value::as_u64))
        .max()
        .unwrap_or(0)
}

fn path_string(path: &Path) -> Result<String> {
    let absolute: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    absolute
        .to_str()
        .map(String::from)
        .context("the data directory's path is not UTF-8")
}

/// Turns trainer progress into job events and checkpoints.
struct JobObserver<'a> {
    service: &'a FineTuning,
    job: &'a JobRecord,
    control: Arc<TrainerControl>,
    epochs: usize,
    steps_per_epoch: usize,
    last: Option<StepMetrics>,
    tokenizer: &'a TextTokenizer,
    template: &'a ChatTemplate,
}

impl JobObserver<'_> {
    fn record(&self, result: Result<()>) {
        if let Err(e) = result {
            tracing::warn!(job = %self.job.id, "recording progress: {e:#}");
        }
    }
}

impl Observer for JobObserver<'_> {
    fn on_step(&mut self, m: &StepMetrics) {
        #[cfg(test)]
        if self.job.suffix.as_deref() == Some(super::fault_tests::PANIC_SUFFIX) && m.step == 2 {
            panic!("injected panic at step {}", m.step);
        }
        self.steps_per_epoch = (m.total_steps / self.epochs.max(1)).max(1);
        let every = self.service.settings.fine_tuning.metrics_every.max(1);
        if m.step.is_multiple_of(every) || m.step == m.total_steps {
            let data = json!({
                "step": m.step, "total_steps": m.total_steps, "epoch": m.epoch, "train_loss": m.loss,
                "learning_rate": m.lr, "grad_norm": m.grad_norm, "tokens_per_s": m.tokens_per_s,
                "trained_tokens": m.trained_tokens, "peak_memory_bytes": m.peak_memory_bytes,
            });
            let message = format!(
                "Step {}/{}: training loss={:.4}, {:.0} tokens/s",
                m.step, m.total_steps, m.loss, m.tokens_per_s
            );
            self.record(
                self.service
                    .event(&self.job.id, "info", &message, Some(data)),
            );
        }
        self.last = Some(m.clone());
    }

    fn on_memory_fit(&mut self, fit: &MemoryFit) {
        let data = json!({
            "batch_size": fit.batch, "max_batch_size": fit.max_batch, "sequence_tokens": fit.seq,
            "bytes_per_sample": fit.bytes_per_sample, "available_bytes": fit.available_bytes,
        });
        let message = format!("Memory: {}; batch size {}", fit.describe(), fit.batch);
        self.record(
            self.service
                .event(&self.job.id, "info", &message, Some(data)),
        );
        // A lowered "auto" batch is the job's batch from now on (a resume keeps it).
        let batch = fit.batch;
        let updated = self.service.update(&self.job.id, |j| {
            j.hyperparameters["batch_size"] = json!(batch);
        });
        self.record(updated.map(drop));
    }

    fn on_validation(&mut self, epoch: usize, step: usize, loss: f64) {
        let data = json!({"step": step, "epoch": epoch, "valid_loss": loss});
        let message = format!("Epoch {}: validation loss={loss:.4}", epoch + 1);
        self.record(
            self.service
                .event(&self.job.id, "info", &message, Some(data)),
        );
    }

    /// The trainer saves every 50 steps and at each epoch's end. Each epoch end becomes a
    /// checkpoint model, served under its `ckpt-step-N` name; the newest `KEPT_CHECKPOINTS`
    /// stay, as OpenAI keeps the last epochs'.
    fn on_checkpoint(&mut self, step: usize, _dir: &Path, model: &Model) {
        if step == 0 || !step.is_multiple_of(self.steps_per_epoch) {
            return;
        }
        let id = &self.job.id;
        let result = (|| {
            if self.service.store.has_checkpoint(id, step as u64)? {
                return Ok(());
            }
            let train_loss = self
                .last
                .as_ref()
                .filter(|m| m.step == step)
                .map(|m| m.loss);
            let name = format!(
                "ft:{}:rewind:{}:{}:ckpt-step-{step}",
                self.job.model,
                self.job.suffix.clone().unwrap_or_default(),
                id
            );
            publish_model(
                self.service,
                model,
                self.tokenizer,
                self.template,
                &name,
                &checkpoint_dir_name(id, step),
            )?;
            self.service.store.insert_checkpoint(&CheckpointRecord {
                id: crate::store::new_id("ftckpt_"),
                job_id: id.clone(),
                created_at: unix_now(),
                step_number: step as u64,
                fine_tuned_model_checkpoint: name.clone(),
                metrics: json!({"step": step, "train_loss": train_loss}),
            })?;
            self.service.event(
                id,
                "info",
                &format!("Checkpoint created at step {step}: {name}"),
                None,
            )?;
            let kept = self
                .service
                .store
                .list_checkpoints(id, None, crate::store::ALL)?;
            for old in kept.data.iter().skip(KEPT_CHECKPOINTS) {
                // The record first: a crash in between leaves a model no longer listed, never a
                // listed checkpoint whose model is gone.
                self.service.store.delete_checkpoint(&old.id)?;
                self.service
                    .delete_model(&old.fine_tuned_model_checkpoint)?;
            }
            Ok(())
        })();
        self.record(result);
    }

    fn cancelled(&self) -> bool {
        self.service.trainer_stops(&self.control)
    }
}
