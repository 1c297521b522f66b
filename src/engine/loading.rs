//! The loader thread: reads models from disk (fetching known ones first) so the engine thread
//! never stalls the streams it is decoding while a model loads.
//!
//! The engine thread sends a [`LoadTask`] and goes on stepping its batch; the loader reads the
//! model's card (tokenizer, chat template, configuration) or its weights and sends them back as
//! a [`LoadDone`], which the engine thread takes between steps: it stays the only owner of the
//! models it serves. One thread loads one model at a time, so loads never hold more than one
//! model's worth of extra memory; a load that panics is reported as a failed load.

use crate::engine::registry::ModelSpec;
use crate::model::loader::{self, LoadOptions, LoadedModel, ModelCard};
use crate::model::reversible::ReversibleConfig;
use anyhow::{Context, Result};
use candle_core::Device;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Instant;

/// What the engine thread asks for.
pub(crate) struct LoadTask {
    /// Matches the answer to the request.
    pub ticket: u64,
    pub spec: ModelSpec,
    /// The weights too, or only the card.
    pub weights: bool,
}

/// What came off the disk.
pub(crate) enum Loaded {
    Card(Box<ModelCard>),
    Weights(Box<LoadedModel>),
}

/// The answer to a [`LoadTask`].
pub(crate) struct LoadDone {
    pub ticket: u64,
    /// The error (or panic) message when the load failed.
    pub outcome: Result<Loaded, String>,
    /// Seconds the load took.
    pub secs: f32,
}

/// The engine thread's end of the loader: dropping it ends the loader thread once its current
/// load is done.
pub(crate) struct Loader {
    tasks: Sender<LoadTask>,
    done: Receiver<LoadDone>,
    in_flight: usize,
}

impl Loader {
    pub fn start(device: Device) -> Result<Self> {
        let (tasks, task_rx) = mpsc::channel::<LoadTask>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("rewind-loader".into())
            .spawn(move || {
                while let Ok(task) = task_rx.recv() {
                    let started = Instant::now();
                    let outcome = catch_unwind(AssertUnwindSafe(|| load(&task, &device)))
                        .unwrap_or_else(|panic| {
                            Err(anyhow::anyhow!(
                                "loading panicked: {}",
                                super::panic_message(panic.as_ref())
                            ))
                        })
                        .map_err(|e| format!("{e:#}"));
                    let done = LoadDone {
                        ticket: task.ticket,
                        outcome,
                        secs: started.elapsed().as_secs_f32(),
                    };
                    if done_tx.send(done).is_err() {
                        return; // the engine thread has gone
                    }
                }
            })
            .context("starting the model loader thread")?;
        Ok(Self {
            tasks,
            done,
            in_flight: 0,
        })
    }

    /// Queues a load; its answer comes from [`Loader::try_done`].
    pub fn submit(&mut self, task: LoadTask) -> Result<(), String> {
        self.tasks
            .send(task)
            .map_err(|_| "the model loader thread has stopped".to_string())?;
        self.in_flight += 1;
        Ok(())
    }

    /// A finished load, if one is waiting; an error once the loader thread is gone (it catches
    /// panics, so only an abort could end it), when nothing in flight will be answered.
    pub fn try_done(&mut self) -> Result<Option<LoadDone>, String> {
        match self.done.try_recv() {
            Ok(done) => {
                self.in_flight -= 1;
                Ok(Some(done))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) if self.in_flight > 0 => {
                self.in_flight = 0;
                Err("the model loader thread has stopped".into())
            }
            Err(TryRecvError::Disconnected) => Ok(None),
        }
    }

    /// Loads submitted and not yet taken back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

fn load(task: &LoadTask, device: &Device) -> Result<Loaded> {
    #[cfg(test)]
    crate::engine::faults::delay_load(&task.spec.id);
    let spec = &task.spec;
    let path = crate::provision::resolve(Some(&spec.source))?;
    if !task.weights {
        return Ok(Loaded::Card(Box::new(loader::describe(&path)?)));
    }
    let reversible = spec
        .scheme
        .as_deref()
        .map(ReversibleConfig::parse)
        .transpose()?;
    let mut loaded = loader::load(
        &path,
        &LoadOptions {
            format: spec.format,
            device: device.clone(),
            reversible,
        },
    )?;
    let packed = loaded.model.pack_for_decoding()?;
    tracing::info!(
        model = %spec.id,
        path = %path.display(),
        scheme = %loaded.model.reversible.label(),
        packed_cpu_kernels = packed,
        "model weights read"
    );
    Ok(Loaded::Weights(Box::new(loaded)))
}
