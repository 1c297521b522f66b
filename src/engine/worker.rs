//! The engine thread: owns the device and the weights, and runs the continuous batching loop.
//!
//! Each iteration:
//! 1. takes new commands (blocking only when there is nothing to do);
//! 2. drops requests whose client went away, waiting or running;
//! 3. admits waiting requests as the scheduler allows: their sequences join the batch and are
//!    prefilled by the same forward that decodes the others;
//! 4. runs one batched forward per model over all its running sequences, samples a token for
//!    each (under its grammar mask when constrained) and sends it to the request's channel;
//! 5. frees the slots of finished sequences.
//!
//! Configured models' weights stay in memory. Fine-tuned models (every job adds one, plus its
//! checkpoints) are many and rarely all in use, so at most `max_loaded_fine_tuned` of them are
//! held: one whose weights are out is loaded when a request for it is admitted, and the least
//! recently used fine-tuned model no running request holds gives way.

use crate::engine::grammar::Matcher;
use crate::engine::metrics::Metrics;
use crate::engine::registry::{ModelSpec, ModelState, Registry, ServedModel};
use crate::engine::scheduler::{Scheduler, SchedulerLimits};
use crate::engine::{Command, Event, Job};
use crate::model::decoder::{Model, SeqInput};
use crate::model::generate::Sequence;
use crate::model::kv_cache::KvCache;
use crate::model::loader::{self, LoadOptions, LoadedModel, ModelCard};
use crate::model::reversible::ReversibleConfig;
use anyhow::{anyhow, Result};
use candle_core::Device;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

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
    grammar: Option<Matcher>,
}

/// A model whose weights are in memory.
struct Resident {
    model: Arc<Model>,
    /// Configured models stay; fine-tuned ones give way to the next one needed.
    pinned: bool,
    /// The worker's use count when a request last took this model.
    last_used: u64,
}

pub(crate) struct Worker {
    rx: Receiver<Command>,
    device: Device,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    models: HashMap<String, Resident>,
    max_loaded_fine_tuned: usize,
    uses: u64,
    scheduler: Scheduler<u64>,
    waiting: HashMap<u64, Job>,
    running: Vec<Active>,
    mask: Vec<bool>,
    stopped: bool,
}

impl Worker {
    pub fn new(
        rx: Receiver<Command>,
        device: Device,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        limits: SchedulerLimits,
        max_loaded_fine_tuned: usize,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            rx,
            device,
            registry,
            metrics,
            queued,
            models: HashMap::new(),
            max_loaded_fine_tuned,
            uses: 0,
            scheduler: Scheduler::new(limits),
            waiting: HashMap::new(),
            running: Vec::new(),
            mask: Vec::new(),
            stopped: false,
        }
    }

    pub fn run(mut self) {
        loop {
            if self.scheduler.is_idle() {
                if self.stopped {
                    return;
                }
                // Nothing to decode: sleep until a command arrives.
                match self.rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
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
            Command::Generate(job) => {
                self.scheduler.push(job.id, job.demand);
                self.waiting.insert(job.id, job);
            }
            Command::Register {
                spec,
                load_weights,
                done,
            } => {
                let outcome = self
                    .register(&spec, load_weights)
                    .map_err(|e| format!("{e:#}"));
                if let Err(e) = &outcome {
                    tracing::error!(model = %spec.id, "loading failed: {e}");
                    self.registry
                        .set_state(&spec.id, ModelState::Failed(e.clone()));
                }
                if let Some(done) = done {
                    let _ = done.send(outcome);
                }
            }
            Command::Unload { id } => {
                // Running requests keep their own reference until they finish.
                self.models.remove(&id);
                self.publish_loaded();
                tracing::info!(model = %id, "model unloaded");
            }
        }
    }

    /// Publishes the model's card, so requests for it are accepted, with its weights in memory
    /// when `load_weights` (or read from its files alone otherwise).
    fn register(&mut self, spec: &ModelSpec, load_weights: bool) -> Result<()> {
        let (card, model) = if load_weights {
            let loaded = self.load_weights(spec)?;
            let card = ModelCard {
                config: loaded.model.config.clone(),
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
            };
            (card, Some(loaded.model))
        } else {
            let path = crate::provision::resolve(Some(&spec.source))?;
            (loader::describe(&path)?, None)
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
        Ok(())
    }

    /// Loads a model's weights, first unloading an idle fine-tuned model if this one would
    /// exceed the limit (so memory holds no more than the limit allows while it loads).
    fn load_weights(&mut self, spec: &ModelSpec) -> Result<LoadedModel> {
        if spec.is_fine_tuned() {
            self.unload_idle(self.max_loaded_fine_tuned.saturating_sub(1));
        }
        let started = Instant::now();
        let path = crate::provision::resolve(Some(&spec.source))?;
        let reversible = spec
            .scheme
            .as_deref()
            .map(ReversibleConfig::parse)
            .transpose()?;
        let loaded = loader::load(
            &path,
            &LoadOptions {
                format: spec.format,
                device: self.device.clone(),
                reversible,
            },
        )?;
        self.metrics.model_loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            model = %spec.id,
            path = %path.display(),
            scheme = %loaded.model.reversible.label(),
            secs = started.elapsed().as_secs_f32(),
            "model weights loaded"
        );
        Ok(loaded)
    }

    /// The weights of model `id`, loaded now if they are out.
    fn weights(&mut self, id: &str) -> Result<Arc<Model>> {
        self.uses += 1;
        if let Some(resident) = self.models.get_mut(id) {
            resident.last_used = self.uses;
            return Ok(resident.model.clone());
        }
        let spec = self
            .registry
            .spec(id)
            .ok_or_else(|| anyhow!("model `{id}` is no longer served"))?;
        let model = match self.load_weights(&spec) {
            Ok(loaded) => loaded.model,
            Err(e) => {
                // Its files went bad since it was registered: later requests fail at once
                // instead of each stalling the engine on another load.
                let message = format!("{e:#}");
                self.registry.set_state(id, ModelState::Failed(message));
                return Err(e);
            }
        };
        // Deleted while it loaded.
        if self.registry.spec(id).is_none() {
            return Err(anyhow!("model `{id}` is no longer served"));
        }
        Ok(self.make_resident(&spec, model))
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
        self.metrics
            .loaded_models
            .store(self.models.len(), Ordering::Relaxed);
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

    /// Requests whose client has gone: waiting ones leave the queue, running ones free their
    /// sequences.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .waiting
            .values()
            .filter(|j| j.events.is_closed())
            .map(|j| j.id)
            .collect();
        for id in gone {
            self.waiting.remove(&id);
            self.scheduler.remove_waiting(id);
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .cancelled_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        let scheduler = &mut self.scheduler;
        let metrics = &self.metrics;
        self.running.retain(|a| {
            if a.job.events.is_closed() {
                scheduler.release_all(a.job.id);
                metrics.cancelled_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(request = a.job.id, "client went away: request cancelled");
                false
            } else {
                true
            }
        });
    }

    fn admit(&mut self) {
        for id in self.scheduler.admit() {
            let Some(job) = self.waiting.remove(&id) else {
                continue;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let model = match self.weights(&job.request.model.id) {
                Ok(model) => model,
                Err(e) => {
                    tracing::error!(model = %job.request.model.id, "{e:#}");
                    let _ = job.events.send(Event::Error(format!("{e:#}")));
                    self.scheduler.release_all(id);
                    continue;
                }
            };
            let r = &job.request;
            let mut seqs = Vec::with_capacity(r.choices());
            for (p, prompt) in r.prompts.iter().enumerate() {
                for j in 0..r.n {
                    let choice = p * r.n + j;
                    let mut params = r.params.clone();
                    params.sampling.seed =
                        params.sampling.seed.map(|s| s.wrapping_add(choice as u64));
                    let seq = Sequence::new(&model, prompt.clone(), params);
                    let grammar = r.grammar.clone().map(Matcher::new);
                    seqs.push(ActiveSeq {
                        choice,
                        seq,
                        grammar,
                    });
                }
            }
            let prompt_tokens: usize = r.prompts.iter().map(Vec::len).sum();
            self.metrics
                .prompt_tokens
                .fetch_add((prompt_tokens * r.n) as u64, Ordering::Relaxed);
            self.running.push(Active {
                job,
                model,
                seqs,
                first_token_sent: false,
            });
        }
    }

    /// One batched forward per model over every running sequence, then one token each.
    fn step(&mut self) {
        let mut models: Vec<Arc<Model>> = Vec::new();
        for a in &self.running {
            if !models.iter().any(|m| Arc::ptr_eq(m, &a.model)) {
                models.push(a.model.clone());
            }
        }
        let mut produced = 0u64;
        for model in models {
            produced += self.step_model(&model);
        }
        self.metrics.observe_step(produced, Instant::now());
        self.running.retain(|a| !a.seqs.is_empty());
    }

    fn step_model(&mut self, model: &Arc<Model>) -> u64 {
        let logits = {
            let mut inputs: Vec<SeqInput<'_>> = self
                .running
                .iter_mut()
                .filter(|a| Arc::ptr_eq(&a.model, model))
                .flat_map(|a| a.seqs.iter_mut().map(|s| s.seq.input()))
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
                    let _ = a
                        .job
                        .events
                        .send(Event::Error(format!("inference failed: {e}")));
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
            let mut failed = None;
            let mut gone = false;
            let mut finished = Vec::new();
            for (i, s) in a.seqs.iter_mut().enumerate() {
                // Every sequence takes its row, even when the request is being abandoned, so the
                // rows of the requests after it stay aligned.
                let Some(mut row) = rows.next() else { break };
                if failed.is_some() || gone {
                    continue;
                }
                if let Some(matcher) = &s.grammar {
                    let table = served.token_table();
                    table.mask(matcher, &mut self.mask);
                    for (logit, &ok) in row.iter_mut().zip(&self.mask) {
                        if !ok {
                            *logit = f32::NEG_INFINITY;
                        }
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
                if let Some(matcher) = &mut s.grammar {
                    if !served.tokenizer.is_eos(output.token) {
                        matcher.feed(served.token_table().bytes(output.token));
                    }
                }
                if !a.first_token_sent {
                    a.first_token_sent = true;
                    self.metrics
                        .observe_ttft(a.job.arrived.elapsed().as_secs_f64());
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
                let _ = a.job.events.send(Event::Error(message));
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
        m.running_seqs
            .store(self.scheduler.running_seqs(), Ordering::Relaxed);
        m.waiting_requests
            .store(self.queued.load(Ordering::Relaxed), Ordering::Relaxed);
        m.kv_cache_reserved_bytes
            .store(self.scheduler.reserved_bytes(), Ordering::Relaxed);
        let used: usize = self
            .running
            .iter()
            .flat_map(|a| a.seqs.iter())
            .map(|s| s.seq.cache.bytes())
            .sum();
        m.kv_cache_bytes.store(used, Ordering::Relaxed);
    }
}
