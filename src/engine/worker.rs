//! The engine thread: owns the device's models and runs the continuous batching loop.
//!
//! Each iteration:
//! 1. takes new commands (blocking only when there is nothing to do) and the models the loader
//!    thread has finished reading;
//! 2. drops requests whose client went away, and those that waited longer than
//!    `model_load_timeout` for their model's weights (503);
//! 3. admits waiting requests as the scheduler allows: their sequences join the batch and are
//!    prefilled by the same forward that decodes the others;
//! 4. runs one batched forward per model over all its running sequences, samples a token for
//!    each (under its grammar mask when constrained) and sends it to the request's channel;
//! 5. frees the slots of finished sequences.
//!
//! Reading a model from disk (and fetching a known one) is the loader thread's work
//! ([`super::loading`]), never this thread's, so the streams in flight keep decoding while a
//! model loads. A request for a model whose weights are out waits, counted in the queue, while
//! the loader reads them, and joins the scheduler's queue when they arrive.
//!
//! Configured models' weights stay in memory. Fine-tuned models (every job adds one, plus its
//! checkpoints) are many and rarely all in use, so at most `max_loaded_fine_tuned` of them are
//! held: one whose weights are out is loaded when a request for it arrives, and the least
//! recently used fine-tuned model no request holds gives way.
//!
//! Panics: one in a model's batched step fails that batch's requests (500, or an error event on
//! a stream already started) and frees their batch slots and KV caches; one while a request's
//! sequences are set up fails that request. Either way the thread goes on serving the others.
//! A panic anywhere else ends the thread, which `/health` reports ([`super::Engine::is_alive`]).

use crate::engine::constraint::Constrained;
use crate::engine::loading::{LoadDone, LoadTask, Loaded, Loader};
use crate::engine::metrics::Metrics;
use crate::engine::registry::{ModelSpec, ModelState, Registry, ServedModel};
use crate::engine::scheduler::Scheduler;
use crate::engine::{
    panic_message, Command, EngineError, EngineLimits, Event, GenerateRequest, Job,
};
use crate::model::decoder::{Model, SeqInput};
use crate::model::generate::Sequence;
use crate::model::kv_cache::KvCache;
use crate::model::loader::ModelCard;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often an otherwise idle engine thread looks for finished loads while one is in flight.
const LOAD_POLL: Duration = Duration::from_millis(5);

/// A running request.
struct Active {
    job: Job,
    model: Arc<Model>,
    seqs: Vec<ActiveSeq>,
    first_token_sent: bool,
}

struct ActiveSeq {
    choice: usize,
    seq: Sequence,
    grammar: Option<Constrained>,
    /// When this sequence's previous token was emitted (for the inter-token latency).
    last_token: Option<Instant>,
}

/// A request in the scheduler's queue, with the weights it will run on (holding them keeps
/// them loaded until it has run).
struct Queued {
    job: Job,
    model: Arc<Model>,
}

/// A model whose weights are in memory.
struct Resident {
    model: Arc<Model>,
    /// Configured models stay; fine-tuned ones give way to the next one needed.
    pinned: bool,
    /// The worker's use count when a request last took this model.
    last_used: u64,
}

/// A load the loader thread is working on, and what its result is for.
struct InFlight {
    spec: ModelSpec,
    purpose: Purpose,
}

enum Purpose {
    /// Making a model servable: its card, and its weights when `weights`.
    Register {
        weights: bool,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Weights for the requests in `Worker::awaiting_weights` under the model's id.
    Serve,
}

impl InFlight {
    fn loads_fine_tuned_weights(&self) -> bool {
        self.spec.is_fine_tuned()
            && match self.purpose {
                Purpose::Register { weights, .. } => weights,
                Purpose::Serve => true,
            }
    }
}

pub(crate) struct Worker {
    rx: Receiver<Command>,
    loader: Loader,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Requests submitted and not yet admitted (shared with the handle, which bounds it).
    queued: Arc<AtomicUsize>,
    models: HashMap<String, Resident>,
    max_loaded_fine_tuned: usize,
    load_timeout: Duration,
    uses: u64,
    scheduler: Scheduler<u64>,
    waiting: HashMap<u64, Queued>,
    /// Requests waiting for their model's weights, by model id, in arrival order. An entry
    /// exists exactly while that model's weights are being loaded for them.
    awaiting_weights: HashMap<String, Vec<Job>>,
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    running: Vec<Active>,
    /// Every handle is gone: finish what runs, then return.
    stopped: bool,
    /// The server is stopping: every request is refused.
    shutting_down: bool,
    /// The CPU thread pool can no longer run work: the thread ends, so `/health` reports it.
    broken: bool,
}

impl Worker {
    pub fn new(
        rx: Receiver<Command>,
        loader: Loader,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        limits: EngineLimits,
        max_loaded_fine_tuned: usize,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            rx,
            loader,
            registry,
            metrics,
            queued,
            models: HashMap::new(),
            max_loaded_fine_tuned,
            load_timeout: limits.model_load_timeout,
            uses: 0,
            scheduler: Scheduler::new(limits.scheduler),
            waiting: HashMap::new(),
            awaiting_weights: HashMap::new(),
            in_flight: HashMap::new(),
            next_ticket: 0,
            running: Vec::new(),
            stopped: false,
            shutting_down: false,
            broken: false,
        }
    }

    pub fn run(mut self) {
        loop {
            if self.broken {
                return;
            }
            if self.scheduler.is_idle() {
                if self.stopped {
                    return;
                }
                // Nothing to decode: sleep until a command arrives, or while a load is in
                // flight, until it may have finished.
                if self.loader.in_flight() == 0 {
                    match self.rx.recv() {
                        Ok(cmd) => self.handle(cmd),
                        Err(_) => return,
                    }
                } else {
                    match self.rx.recv_timeout(LOAD_POLL) {
                        Ok(cmd) => self.handle(cmd),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => self.stopped = true,
                    }
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // Every handle is gone: finish what is running, then stop.
                        self.stopped = true;
                        break;
                    }
                }
            }
            self.take_loads();
            self.expire_weight_waits();
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            // Models all in use when another was loaded stay over the limit until they finish.
            self.unload_idle(self.max_loaded_fine_tuned);
            self.publish_gauges();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(job) => self.enqueue(job),
            Command::Register {
                spec,
                load_weights,
                done,
            } => self.start_load(
                spec,
                Purpose::Register {
                    weights: load_weights,
                    done,
                },
            ),
            Command::Unload { id } => {
                // Running requests keep their own reference until they finish.
                self.models.remove(&id);
                self.publish_loaded();
                tracing::info!(model = %id, "model unloaded");
            }
            Command::Shutdown => self.shut_down(),
            #[cfg(test)]
            Command::Panic => panic!("injected panic on the engine thread"),
        }
    }

    /// Queues a request behind its model's weights: at once when they are in memory, else
    /// once the loader has read them.
    fn enqueue(&mut self, job: Job) {
        if self.shutting_down {
            self.fail_queued(job, shutting_down());
            return;
        }
        let id = job.request.model.id.clone();
        if let Some(model) = self.touch(&id) {
            self.scheduler.push(job.id, job.demand);
            self.waiting.insert(job.id, Queued { job, model });
            return;
        }
        if let Some(waiters) = self.awaiting_weights.get_mut(&id) {
            waiters.push(job);
            return;
        }
        let Some(spec) = self.registry.spec(&id) else {
            self.fail_queued(
                job,
                EngineError::Failed(format!("model `{id}` is no longer served")),
            );
            return;
        };
        self.awaiting_weights.insert(id, vec![job]);
        self.start_load(spec, Purpose::Serve);
    }

    /// Hands a load to the loader thread. Fine-tuned weights first make room: memory never holds
    /// more of them than the limit allows, counting those on their way.
    fn start_load(&mut self, spec: ModelSpec, purpose: Purpose) {
        let flight = InFlight { spec, purpose };
        if flight.loads_fine_tuned_weights() {
            let coming = 1 + self
                .in_flight
                .values()
                .filter(|f| f.loads_fine_tuned_weights())
                .count();
            self.unload_idle(self.max_loaded_fine_tuned.saturating_sub(coming));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let task = LoadTask {
            ticket,
            spec: flight.spec.clone(),
            weights: !matches!(flight.purpose, Purpose::Register { weights: false, .. }),
        };
        self.in_flight.insert(ticket, flight);
        if let Err(message) = self.loader.submit(task) {
            self.finish_load(LoadDone {
                ticket,
                outcome: Err(message),
                secs: 0.0,
            });
        }
    }

    /// Takes the loads the loader thread has finished.
    fn take_loads(&mut self) {
        loop {
            match self.loader.try_done() {
                Ok(Some(done)) => self.finish_load(done),
                Ok(None) => return,
                Err(message) => {
                    let tickets: Vec<u64> = self.in_flight.keys().copied().collect();
                    for ticket in tickets {
                        self.finish_load(LoadDone {
                            ticket,
                            outcome: Err(message.clone()),
                            secs: 0.0,
                        });
                    }
                    return;
                }
            }
        }
    }

    fn finish_load(&mut self, done: LoadDone) {
        let Some(flight) = self.in_flight.remove(&done.ticket) else {
            return;
        };
        let spec = flight.spec;
        if let Ok(Loaded::Weights(_)) = &done.outcome {
            self.metrics.model_loads.inc();
            tracing::info!(model = %spec.id, secs = done.secs, "model weights loaded");
        }
        match flight.purpose {
            Purpose::Register { done: reply, .. } => {
                let outcome = done.outcome.map(|loaded| self.register(&spec, loaded));
                if let Err(e) = &outcome {
                    tracing::error!(model = %spec.id, "loading failed: {e}");
                    self.registry
                        .set_state(&spec.id, ModelState::Failed(e.clone()));
                }
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            Purpose::Serve => {
                let waiters = self.awaiting_weights.remove(&spec.id).unwrap_or_default();
                let model = match done.outcome {
                    // The registry may have dropped the model while it loaded (deleted meanwhile).
                    Ok(Loaded::Weights(loaded)) if self.registry.spec(&spec.id).is_some() => {
                        Ok(self.make_resident(&spec, loaded.model))
                    }
                    Ok(_) => Err(EngineError::Failed(format!(
                        "model `{}` is no longer served",
                        spec.id
                    ))),
                    Err(message) => {
                        // Its files went bad since it was registered: later requests fail at
                        // once instead of each waiting for another load.
                        tracing::error!(model = %spec.id, "loading failed: {message}");
                        self.registry
                            .set_state(&spec.id, ModelState::Failed(message.clone()));
                        Err(EngineError::Failed(message))
                    }
                };
                for job in waiters {
                    match &model {
                        Ok(model) => {
                            self.scheduler.push(job.id, job.demand);
                            self.waiting.insert(
                                job.id,
                                Queued {
                                    job,
                                    model: model.clone(),
                                },
                            );
                        }
                        Err(e) => self.fail_queued(job, e.clone()),
                    }
                }
            }
        }
    }

    /// Publishes the model's card, so requests for it are accepted, with its weights in memory
    /// when they were loaded.
    fn register(&mut self, spec: &ModelSpec, loaded: Loaded) {
        let (card, model) = match loaded {
            Loaded::Weights(loaded) => (
                ModelCard {
                    config: loaded.model.config.clone(),
                    tokenizer: loaded.tokenizer,
                    chat_template: loaded.chat_template,
                },
                Some(loaded.model),
            ),
            Loaded::Card(card) => (*card, None),
        };
        let served = ServedModel::new(
            spec.id.clone(),
            card.tokenizer,
            card.chat_template,
            card.config.max_position_embeddings,
            KvCache::bytes_per_token(&card.config, spec.format.dense_dtype()),
            card.config.vocab_size,
        );
        // The registry may have dropped the model while it loaded (deleted meanwhile).
        if self.registry.spec(&spec.id).is_some() {
            if let Some(model) = model {
                self.make_resident(spec, model);
            }
            self.registry
                .set_state(&spec.id, ModelState::Ready(Arc::new(served)));
        }
    }

    /// The weights of model `id` when they are in memory, marked as just used.
    fn touch(&mut self, id: &str) -> Option<Arc<Model>> {
        self.uses += 1;
        let resident = self.models.get_mut(id)?;
        resident.last_used = self.uses;
        Some(resident.model.clone())
    }

    fn make_resident(&mut self, spec: &ModelSpec, model: Model) -> Arc<Model> {
        self.uses += 1;
        let pinned = !spec.is_fine_tuned();
        let model = Arc::new(model);
        self.models.insert(
            spec.id.clone(),
            Resident {
                model: model.clone(),
                pinned,
                last_used: self.uses,
            },
        );
        self.publish_loaded();
        model
    }

    fn publish_loaded(&self) {
        self.metrics.loaded_models.set(self.models.len() as i64);
    }

    /// Drops the weights of the least recently used fine-tuned models no request holds while
    /// more than `at_most` are loaded.
    fn unload_idle(&mut self, at_most: usize) {
        loop {
            let loaded = self.models.values().filter(|r| !r.pinned).count();
            if loaded <= at_most {
                return;
            }
            let idle = self
                .models
                .iter()
                .filter(|(_, r)| !r.pinned && Arc::strong_count(&r.model) == 1)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(id, _)| id.clone());
            let Some(id) = idle else { return };
            self.models.remove(&id);
            self.publish_loaded();
            tracing::info!(model = %id, "weights unloaded (least recently used fine-tuned model)");
        }
    }

    /// Ends a request that was never admitted.
    fn fail_queued(&self, job: Job, error: EngineError) {
        let _ = job.events.send(Event::Error(error));
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Requests that have waited `load_timeout` for their model's weights get 503; the load goes
    /// on, for the requests after them.
    fn expire_weight_waits(&mut self) {
        let timeout = self.load_timeout;
        let mut expired = Vec::new();
        for (id, jobs) in self.awaiting_weights.iter_mut() {
            let (late, on_time): (Vec<Job>, Vec<Job>) = std::mem::take(jobs)
                .into_iter()
                .partition(|j| j.arrived.elapsed() >= timeout);
            *jobs = on_time;
            expired.extend(late.into_iter().map(|j| (id.clone(), j)));
        }
        for (id, job) in expired {
            tracing::warn!(model = %id, request = job.id, "gave up waiting for the model to load");
            self.fail_queued(
                job,
                EngineError::Unavailable(format!(
                    "The model `{id}` is still loading after {} s; retry shortly.",
                    timeout.as_secs()
                )),
            );
        }
    }

    /// Requests whose client has gone: waiting ones leave the queue, running ones free their
    /// sequences.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .waiting
            .values()
            .filter(|q| q.job.events.is_closed())
            .map(|q| q.job.id)
            .collect();
        let mut dropped = gone.len();
        for id in gone {
            self.waiting.remove(&id);
            self.scheduler.remove_waiting(id);
        }
        for jobs in self.awaiting_weights.values_mut() {
            let before = jobs.len();
            jobs.retain(|j| !j.events.is_closed());
            dropped += before - jobs.len();
        }
        self.queued.fetch_sub(dropped, Ordering::AcqRel);
        self.metrics.cancelled_requests.inc_by(dropped as u64);
        let scheduler = &mut self.scheduler;
        let metrics = &self.metrics;
        self.running.retain(|a| {
            if a.job.events.is_closed() {
                scheduler.release_all(a.job.id);
                metrics.cancelled_requests.inc();
                tracing::debug!(request = a.job.id, "client went away: request cancelled");
                false
            } else {
                true
            }
        });
    }

    fn admit(&mut self) {
        for id in self.scheduler.admit() {
            let Some(Queued { job, model }) = self.waiting.remove(&id) else {
                continue;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .observe_queue_wait(job.arrived.elapsed().as_secs_f64());
            let seqs = match catch_unwind(AssertUnwindSafe(|| sequences(&job.request, &model))) {
                Ok(seqs) => seqs,
                Err(panic) => {
                    let message = panic_message(panic.as_ref());
                    tracing::error!(request = id, "setting up the request panicked: {message}");
                    let _ = job.events.send(Event::Error(EngineError::Failed(format!(
                        "setting up the request failed: {message}"
                    ))));
                    self.scheduler.release_all(id);
                    continue;
                }
            };
            let r = &job.request;
            let prompt_tokens: usize = r.prompts.iter().map(Vec::len).sum();
            self.metrics
                .prompt_tokens
                .inc_by((prompt_tokens * r.n) as u64);
            self.running.push(Active {
                job,
                model,
                seqs,
                first_token_sent: false,
            });
        }
    }

    /// The server is stopping: every request the engine holds ends with a 503 (a final error
    /// event for streams), and later ones are refused.
    fn shut_down(&mut self) {
        self.shutting_down = true;
        self.stop_serving(shutting_down);
        tracing::info!("engine stopped serving: the server is shutting down");
    }

    /// Ends every request the engine holds with `reason`.
    fn stop_serving(&mut self, reason: fn() -> EngineError) {
        let mut queued: Vec<Job> = self.waiting.drain().map(|(_, q)| q.job).collect();
        for jobs in self.awaiting_weights.values_mut() {
            queued.append(jobs);
        }
        for job in queued {
            self.scheduler.remove_waiting(job.id);
            self.fail_queued(job, reason());
        }
        for a in self.running.drain(..) {
            let _ = a.job.events.send(Event::Error(reason()));
            self.scheduler.release_all(a.job.id);
        }
    }

    /// One batched forward per model over every running sequence, then one token each.
    fn step(&mut self) {
        let started = Instant::now();
        let mut models: Vec<Arc<Model>> = Vec::new();
        for a in &self.running {
            if !models.iter().any(|m| Arc::ptr_eq(m, &a.model)) {
                models.push(a.model.clone());
            }
        }
        let mut produced = 0u64;
        for model in models {
            match catch_unwind(AssertUnwindSafe(|| self.step_model(&model))) {
                Ok(n) => produced += n,
                Err(panic) => {
                    self.abandon_batch(&model, &panic_message(panic.as_ref()));
                    if !crate::model::parallel::pool_is_usable() {
                        // A panic inside one of candle's own parallel ops poisoned its thread
                        // pool: no CPU op can run again in this process.
                        tracing::error!("the CPU thread pool is unusable after that panic: the engine stops (/health answers 503); restart the server");
                        self.stop_serving(engine_broken);
                        self.broken = true;
                        return;
                    }
                }
            }
        }
        self.metrics.observe_step(produced, started, Instant::now());
        self.running.retain(|a| !a.seqs.is_empty());
    }

    /// After a panic in `model`'s step its sequences may be half-updated (a position in the KV
    /// cache with no token sampled for it, a grammar fed part way), so none of them goes on:
    /// each request still running fails, and its batch slots and KV caches are freed.
    fn abandon_batch(&mut self, model: &Arc<Model>, message: &str) {
        tracing::error!("a batched step panicked: {message}; its requests are dropped");
        for a in self
            .running
            .iter_mut()
            .filter(|a| Arc::ptr_eq(&a.model, model) && !a.seqs.is_empty())
        {
            let _ = a.job.events.send(Event::Error(EngineError::Failed(format!(
                "inference failed: {message}"
            ))));
            self.scheduler.release_all(a.job.id);
            a.seqs.clear();
        }
    }

    fn step_model(&mut self, model: &Arc<Model>) -> u64 {
        let prefill_chunk = self.scheduler.limits().max_prefill_tokens;
        let logits = {
            let mut inputs: Vec<SeqInput<'_>> = self
                .running
                .iter_mut()
                .filter(|a| Arc::ptr_eq(&a.model, model))
                .flat_map(|a| a.seqs.iter_mut().map(|s| s.seq.input(prefill_chunk)))
                .collect();
            model
                .forward_step(&mut inputs)
                .and_then(|t| t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>())
        };
        let mut rows = match logits {
            Ok(rows) => rows.into_iter(),
            Err(e) => {
                tracing::error!("forward step failed: {e}");
                for a in self
                    .running
                    .iter_mut()
                    .filter(|a| Arc::ptr_eq(&a.model, model))
                {
                    let _ = a.job.events.send(Event::Error(EngineError::Failed(format!(
                        "inference failed: {e}"
                    ))));
                    self.scheduler.release_all(a.job.id);
                    a.seqs.clear();
                }
                return 0;
            }
        };

        let mut produced = 0;
        for a in self
            .running
            .iter_mut()
            .filter(|a| Arc::ptr_eq(&a.model, model))
        {
            let served = a.job.request.model.clone();
            #[cfg(test)]
            super::faults::step(&served.id);
            let mut failed = None;
            let mut gone = false;
            let mut finished = Vec::new();
            for (i, s) in a.seqs.iter_mut().enumerate() {
                // Every sequence takes its row, even when the request is being abandoned, so the
                // rows of the requests after it stay aligned.
                let Some(mut row) = rows.next() else { break };
                // A prompt fed in chunks samples only after its last chunk.
                if !s.seq.step_done() || failed.is_some() || gone {
                    continue;
                }
                if let Some(constrained) = &mut s.grammar {
                    if let Err(e) = constrained.apply(&mut row) {
                        failed = Some(format!("constrained decoding failed: {e:#}"));
                        continue;
                    }
                }
                let output = match s.seq.accept(&row, &served.tokenizer) {
                    Ok(o) => o,
                    Err(e) => {
                        failed = Some(format!("sampling failed: {e}"));
                        continue;
                    }
                };
                produced += 1;
                if let Some(constrained) = &mut s.grammar {
                    if !served.tokenizer.is_eos(output.token) {
                        if let Err(e) = constrained.advance(output.token) {
                            failed = Some(format!("constrained decoding failed: {e:#}"));
                            continue;
                        }
                    }
                }
                let now = Instant::now();
                if !a.first_token_sent {
                    a.first_token_sent = true;
                    self.metrics
                        .observe_ttft(now.duration_since(a.job.arrived).as_secs_f64());
                }
                if let Some(previous) = s.last_token.replace(now) {
                    self.metrics
                        .observe_inter_token(now.duration_since(previous).as_secs_f64());
                }
                let done = output.finish.is_some();
                if a.job
                    .events
                    .send(Event::Token {
                        choice: s.choice,
                        output,
                    })
                    .is_err()
                {
                    // The client left since the check; the next iteration drops the request.
                    gone = true;
                    continue;
                }
                if done {
                    finished.push(i);
                }
            }
            if let Some(message) = failed {
                let _ = a
                    .job
                    .events
                    .send(Event::Error(EngineError::Failed(message)));
                self.scheduler.release_all(a.job.id);
                a.seqs.clear();
                continue;
            }
            for &i in finished.iter().rev() {
                a.seqs.remove(i);
                self.scheduler.release_seq(a.job.id);
            }
        }
        produced
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.running_seqs.set(self.scheduler.running_seqs() as i64);
        m.waiting_requests
            .set(self.queued.load(Ordering::Relaxed) as i64);
        m.kv_cache_reserved_bytes
            .set(self.scheduler.reserved_bytes() as i64);
        let used: usize = self
            .running
            .iter()
            .flat_map(|a| a.seqs.iter())
            .map(|s| s.seq.cache.bytes())
            .sum();
        m.kv_cache_bytes.set(used as i64);
    }
}

/// The sequences of an admitted request: choice `p * n + j` is the `j`-th of prompt `p`.
fn sequences(r: &GenerateRequest, model: &Model) -> Vec<ActiveSeq> {
    let mut seqs = Vec::with_capacity(r.choices());
    for (p, prompt) in r.prompts.iter().enumerate() {
        for j in 0..r.n {
            let choice = p * r.n + j;
            let mut params = r.params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(choice as u64));
            seqs.push(ActiveSeq {
                choice,
                seq: Sequence::new(model, prompt.clone(), params),
                grammar: r.grammar.as_ref().map(|g| g.start()),
                last_token: None,
            });
        }
    }
    seqs
}

fn engine_broken() -> EngineError {
    EngineError::Unavailable(
        "The inference engine failed and has stopped; the server needs a restart.".into(),
    )
}

fn shutting_down() -> EngineError {
    EngineError::Unavailable("The server is shutting down; retry shortly.".into())
}
