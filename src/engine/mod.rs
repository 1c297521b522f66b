//! The inference engine: one thread owns the device and the models' weights and runs every
//! sequence in one continuously batched decode loop; the HTTP layer talks to it through
//! [`Engine`], a cheap cloneable handle.
//!
//! A request travels to the engine thread with the sending half of its response channel inside
//! it ([`Job`]), so tokens, errors and the end of the stream (the channel closing) all flow back
//! the same way, and a client that goes away is noticed by the engine as a closed channel: its
//! sequences are dropped and their batch slots and KV memory are freed at the next step.
//!
//! - [`scheduler`]: pure admission rules (batch size, KV budget, prefill per step, FIFO);
//! - [`worker`]: the engine thread's loop;
//! - [`loading`]: the loader thread, which reads models from disk while the engine thread
//!   keeps decoding;
//! - [`registry`]: the served models, shared with the HTTP layer;
//! - [`constraint`]: constrained decoding (JSON Schema and Lark grammars, through llguidance);
//! - [`metrics`]: counters, gauges and latency histograms for `/metrics`.

pub mod constraint;
#[cfg(test)]
pub(crate) mod fault_tests;
#[cfg(test)]
pub(crate) mod faults;
mod loading;
pub mod metrics;
pub mod registry;
pub mod scheduler;
mod worker;

use crate::engine::constraint::Grammar;
use crate::engine::metrics::Metrics;
use crate::engine::registry::{ModelSpec, Registry, ServedModel};
use crate::engine::scheduler::{Demand, Scheduler, SchedulerLimits, Unschedulable};
use crate::model::generate::{GenerationParams, StepOutput};
use crate::settings::Settings;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc as async_mpsc, oneshot};

/// A validated generation request: everything the engine needs, nothing it has to check.
pub struct GenerateRequest {
    pub model: Arc<ServedModel>,
    /// Token ids of each prompt (completions may send several; chat sends one).
    pub prompts: Vec<Vec<u32>>,
    /// Choices per prompt; choice `p * n + j` is the `j`-th completion of prompt `p`.
    pub n: usize,
    /// `max_tokens` is already resolved; a seed is offset per choice so choices differ.
    pub params: GenerationParams,
    /// Constrains the output to a grammar (`response_format`, a required tool call).
    pub grammar: Option<Arc<Grammar>>,
}

impl GenerateRequest {
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    /// What the scheduler must reserve for this request.
    pub fn demand(&self) -> Demand {
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(0);
        Demand {
            seqs: self.choices(),
            kv_bytes_per_seq: self.model.kv_bytes_for(longest + self.params.max_tokens),
            prefill_tokens: self.prompts.iter().map(Vec::len).sum::<usize>() * self.n,
        }
    }
}

/// What the engine sends back for a request. The channel closing after the last sequence
/// finished is the end of the response.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token of one choice; `output.finish` is set on the choice's last one.
    Token { choice: usize, output: StepOutput },
    /// The request failed; nothing follows.
    Error(EngineError),
}

/// Why the engine gave up on a request it had queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// Serving it failed (its model's files went bad, inference failed or panicked): HTTP 500.
    #[error("{0}")]
    Failed(String),
    /// It could not be served now and may be later (its model took too long to load, the
    /// server is stopping): HTTP 503 with `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
}

pub type EventStream = async_mpsc::UnboundedReceiver<Event>;

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded: {0} requests are already waiting; retry shortly")]
    QueueFull(usize),
    #[error("{}", describe(*.0))]
    Unschedulable(Unschedulable),
    #[error("the engine has stopped")]
    Stopped,
}

/// A request on its way to, or inside, the engine thread.
pub(crate) struct Job {
    pub id: u64,
    pub request: GenerateRequest,
    pub events: async_mpsc::UnboundedSender<Event>,
    pub demand: Demand,
    pub arrived: Instant,
}

pub(crate) enum Command {
    Generate(Job),
    /// Makes a model servable: its card always, its weights now when `load_weights` (they load
    /// on its first request otherwise).
    Register {
        spec: ModelSpec,
        load_weights: bool,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    Unload {
        id: String,
    },
    /// The server is stopping: every queued and running request ends with an
    /// [`EngineError::Unavailable`], and so does every later one.
    Shutdown,
    /// Kills the engine thread, outside the regions that catch panics (tests of liveness).
    #[cfg(test)]
    Panic,
}

/// Limits the handle enforces before a request reaches the engine thread.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_queue: usize,
    pub scheduler: SchedulerLimits,
    /// How long a request waits for its model's weights to load before it gets 503.
    pub model_load_timeout: Duration,
}

struct Shared {
    commands: mpsc::Sender<Command>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    limits: EngineLimits,
    /// Requests submitted and not yet admitted (in the channel or the scheduler's queue).
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// Cleared when the engine thread ends, whether it returned or panicked.
    alive: Arc<AtomicBool>,
    /// Set by [`Engine::shutdown`]: new requests are refused.
    shutting_down: AtomicBool,
}

/// Clears a liveness flag when the thread that owns it ends, however it ends.
pub(crate) struct AliveGuard(pub Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The message of a caught panic (`panic!` payloads are a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Registers the configured models (and the fine-tuned ones recorded under the data
    /// directory) and starts the engine thread, which loads them in order. Returns at once:
    /// [`Registry::base_models_ready`] says when serving can begin.
    pub fn start(settings: &Settings) -> Result<Self> {
        let device = crate::settings::parse_device(&settings.server.device)?.open()?;
        crate::durable::create_dir_all(&settings.data_dir)?;
        let registry = Arc::new(Registry::new(Some(settings.data_dir.join("models.json"))));
        let metrics = Arc::new(Metrics::default());
        metrics
            .kv_cache_budget_bytes
            .set(settings.kv_cache_bytes() as i64);
        let limits = EngineLimits {
            max_queue: settings.limits.max_queue,
            scheduler: SchedulerLimits {
                max_batch: settings.limits.max_batch,
                kv_budget: settings.kv_cache_bytes(),
                max_prefill_tokens: settings.limits.max_prefill_tokens,
            },
            model_load_timeout: Duration::from_secs(settings.limits.model_load_timeout_secs as u64),
        };
        let created = unix_now();
        let mut specs: Vec<ModelSpec> = settings
            .served_models()
            .into_iter()
            .map(|m| ModelSpec {
                id: m.served_id(),
                source: m.source,
                scheme: m.scheme,
                format: m.format,
                created,
                owned_by: "rewind".into(),
            })
            .collect();
        specs.extend(registry.stored_fine_tuned()?);
        for spec in &specs {
            registry.insert_loading(spec.clone())?;
        }

        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = worker::Worker::new(
            rx,
            loading::Loader::start(device)?,
            registry.clone(),
            metrics.clone(),
            limits,
            settings.limits.max_loaded_fine_tuned_models,
            queued.clone(),
        );
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name("rewind-engine".into())
            .spawn(move || {
                let _guard = guard;
                worker.run()
            })
            .context("starting the engine thread")?;
        // Configured models are loaded now; fine-tuned ones on their first request.
        for spec in specs {
            let _ = tx.send(Command::Register {
                load_weights: !spec.is_fine_tuned(),
                spec,
                done: None,
            });
        }
        Ok(Self {
            shared: Arc::new(Shared {
                commands: tx,
                registry,
                metrics,
                limits,
                queued,
                next_id: AtomicU64::new(1),
                alive,
                shutting_down: AtomicBool::new(false),
            }),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn limits(&self) -> EngineLimits {
        self.shared.limits
    }

    /// Whether the engine thread is running (false once it has exited or panicked outside the
    /// regions that catch a request's panic).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Whether [`Engine::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Stops serving: queued and running requests end at once with an
    /// [`EngineError::Unavailable`] (a final error event for streams), later ones are refused.
    pub fn shutdown(&self) {
        if !self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            let _ = self.shared.commands.send(Command::Shutdown);
        }
    }

    /// Makes the engine thread panic outside the regions that catch panics.
    #[cfg(test)]
    pub(crate) fn kill_for_test(&self) {
        let _ = self.shared.commands.send(Command::Panic);
    }

    /// Whether a request could ever be scheduled (checked at the edge, before queueing).
    pub fn check(&self, request: &GenerateRequest) -> std::result::Result<(), Unschedulable> {
        Scheduler::<u64>::check(&self.shared.limits.scheduler, &request.demand())
    }

    /// Queues a request; its tokens arrive on the returned stream, which ends when every
    /// choice has finished. Dropping the stream cancels the request.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> std::result::Result<EventStream, SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::Stopped);
        }
        let demand = request.demand();
        Scheduler::<u64>::check(&self.shared.limits.scheduler, &demand)
            .map_err(SubmitError::Unschedulable)?;
        let max_queue = self.shared.limits.max_queue;
        let queued = &self.shared.queued;
        if queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max_queue).then_some(q + 1)
            })
            .is_err()
        {
            return Err(SubmitError::QueueFull(max_queue));
        }
        let (events, stream) = async_mpsc::unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            request,
            events,
            demand,
            arrived: Instant::now(),
        };
        if self.shared.commands.send(Command::Generate(job)).is_err() {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(stream)
    }

    /// Registers a model and has the engine thread load it (so a model that cannot load is
    /// known at once); the returned channel reports the outcome. Fine-tuned models (`ft:` ids)
    /// are recorded under the data directory and served again after a restart; their weights
    /// may later give way to other fine-tuned models' (`limits.max_loaded_fine_tuned_models`).
    pub fn add_model(&self, spec: ModelSpec) -> Result<oneshot::Receiver<Result<(), String>>> {
        self.shared.registry.insert_loading(spec.clone())?;
        let (done, outcome) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Register {
                spec,
                load_weights: true,
                done: Some(done),
            })
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        Ok(outcome)
    }

    /// Stops serving a model: new requests get 404; running ones finish. Returns its spec.
    pub fn remove_model(&self, id: &str) -> Result<Option<ModelSpec>> {
        let removed = self.shared.registry.remove(id)?;
        if removed.is_some() {
            let _ = self
                .shared
                .commands
                .send(Command::Unload { id: id.to_string() });
        }
        Ok(removed)
    }
}

pub fn describe(e: Unschedulable) -> String {
    match e {
        Unschedulable::TooManySequences { seqs, max_batch } => {
            format!("the request needs {seqs} sequences but a batch holds at most {max_batch}; lower `n` or send fewer prompts")
        }
        Unschedulable::KvBudget { needed, budget } => format!(
            "the request's worst case needs {} MiB of KV cache but the server's budget is {} MiB; lower `max_tokens` or `n`",
            needed.div_ceil(1 << 20),
            budget >> 20
        ),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
