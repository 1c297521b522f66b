//! The training loop: epochs of length-grouped batches, gradient accumulation, AdamW with
//! warmup + cosine decay, validation loss per epoch, checkpoints, NaN guard, and progress
//! reported to an observer (the CLI's progress bar, or a job's event log).

use crate::model::block::Layout;
use crate::model::decoder::Model;
use crate::train::backward::{loss_and_grads, Batch, Strategy, HEAD_CHUNK_ROWS};
use crate::train::checkpoint::{self, LoopState};
use crate::train::data::{length_batches, pad_batch, TokenizedExample};
use crate::train::grads::Grads;
use crate::train::loss::{head_loss_sum, Objective, Targets};
use crate::train::memory_fit::{self, BatchRule, MemoryFit};
use crate::train::optimizer::{AdamW, AdamWConfig, Schedule};
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub strategy: Strategy,
    pub epochs: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub optimizer: AdamWConfig,
    /// Fraction of the steps spent warming up.
    pub warmup_ratio: f64,
    pub seed: u64,
    /// Train only parameters whose name contains one of these (empty: all).
    pub train_only: Vec<String>,
    /// Where to keep the resumable checkpoint (None: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Save a checkpoint every this many optimizer steps (and at each epoch end).
    pub checkpoint_every: usize,
    /// Fixed-point residual streams (bit-exact reversible rebuild).
    pub exact: Option<crate::train::exact::FixedPoint>,
    /// Measure the memory a batch needs before the first step, and refuse a `batch_size` that
    /// cannot fit or lower it to what fits (`memory_fit`); None trains as asked.
    #[serde(default)]
    pub batch_rule: Option<BatchRule>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Reversible,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            optimizer: AdamWConfig::default(),
            warmup_ratio: 0.1,
            seed: 0,
            train_only: Vec::new(),
            checkpoint_dir: None,
            checkpoint_every: 50,
            exact: None,
            batch_rule: None,
        }
    }
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub trained_tokens: usize,
    pub peak_memory_bytes: u64,
}

/// Receives progress; `cancelled` is polled between steps (a stop saves a checkpoint first).
pub trait Observer {
    fn on_step(&mut self, metrics: &StepMetrics);
    fn on_validation(&mut self, _epoch: usize, _step: usize, _loss: f64) {}
    /// A checkpoint was saved in `dir` after `step` steps; `model` holds the weights it saved.
    /// Also called again for the checkpoint a run resumes from, so that what an observer does
    /// with a checkpoint (the job runner publishes epoch-end models) is finished even if a crash
    /// interrupted it: observers must take a repeated step as a no-op.
    fn on_checkpoint(&mut self, _step: usize, _dir: &std::path::Path, _model: &Model) {}
    /// The memory plan, when the run measured one (`TrainConfig::batch_rule`).
    fn on_memory_fit(&mut self, _fit: &MemoryFit) {}
    fn cancelled(&self) -> bool {
        false
    }
}

pub struct TrainOutcome {
    /// The model with the trained weights (graph-free).
    pub model: Model,
    pub final_loss: Option<f64>,
    pub validation_loss: Option<f64>,
    pub trained_tokens: usize,
    pub steps: usize,
    pub cancelled: bool,
}

/// Peak resident memory of this process (CPU); 0 where unknown.
pub fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The read-out hidden states of `model` for (B, T) inputs, (B*T, d), without a graph.
pub fn hidden_states(model: &Model, inputs: &Tensor) -> Result<Tensor> {
    let (b, s) = inputs.dims2()?;
    let e = model.embed(&inputs.flatten_all()?)?;
    let top = model.run_stack(&e, &mut Layout::Uniform { batch: b, seq: s })?;
    Ok(model.read_out(&top)?)
}

/// A padded batch of `indices`, with the objective (distillation from `teacher`, when given).
fn batch_of<'a>(
    examples: &[TokenizedExample],
    indices: &[usize],
    pad_id: u32,
    device: &candle_core::Device,
    teacher: Option<&'a Model>,
) -> Result<(Batch<'a>, usize, usize)> {
    let refs: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
    let p = pad_batch(&refs, pad_id, device)?;
    let objective = match teacher {
        Some(teacher) => Objective::Distill {
            teacher,
            teacher_hidden: hidden_states(teacher, &p.inputs)?,
        },
        None => Objective::NextToken,
    };
    Ok((
        Batch {
            inputs: p.inputs,
            targets: Targets {
                ids: p.targets,
                weights: p.weights,
            },
            objective,
        },
        p.trained_tokens,
        p.tokens,
    ))
}

/// Mean loss per trained token over `examples` (no update): cross-entropy, or KL to `teacher`.
pub fn evaluate(
    t: &Trainable,
    examples: &[TokenizedExample],
    config: &TrainConfig,
    pad_id: u32,
    teacher: Option<&Model>,
) -> Result<f64> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for indices in length_batches(&lengths, config.batch_size, 0) {
        let (batch, trained, _) = batch_of(examples, &indices, pad_id, &t.frozen.device, teacher)?;
        if trained == 0 {
            continue;
        }
        let hidden = hidden_states(&t.frozen, &batch.inputs)?;
        total += head_loss_sum(
            &t.frozen,
            &hidden,
            &batch.targets,
            &batch.objective,
            HEAD_CHUNK_ROWS,
        )?;
        count += trained;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    })
}

/// Trains `model` on `train`, validating on `validation` after each epoch. With a `teacher`,
/// the objective is distillation (KL(teacher || model) per token) instead of cross-entropy.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: Model,
    train: &[TokenizedExample],
    validation: &[TokenizedExample],
    pad_id: u32,
    config: &TrainConfig,
    teacher: Option<&Model>,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    if train.is_empty() {
        bail!("no training examples");
    }
    let only = config.train_only.clone();
    let t = Trainable::new(model, |name| {
        only.is_empty() || only.iter().any(|o| name.contains(o.as_str()))
    })?;
    if t.vars.is_empty() {
        bail!(
            "no parameter matches {:?}: nothing to train",
            config.train_only
        );
    }
    let device = t.frozen.device.clone();
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let fitted;
    let config = match config.batch_rule {
        None => config,
        Some(rule) => {
            let longest = lengths.iter().copied().max().unwrap_or(1);
            let fit = memory_fit::fit_batch(
                &t,
                config.strategy,
                config.exact,
                longest,
                config.batch_size,
                rule,
            )?;
            match fit {
                Some(fit) => {
                    observer.on_memory_fit(&fit);
                    fitted = TrainConfig {
                        batch_size: fit.batch,
                        ..config.clone()
                    };
                    &fitted
                }
                None => config,
            }
        }
    };
    let batches_per_epoch = train.len().div_ceil(config.batch_size.max(1));
    let steps_per_epoch = batches_per_epoch.div_ceil(config.grad_accum.max(1));
    let total_steps = steps_per_epoch * config.epochs;
    let schedule = Schedule {
        warmup_steps: ((total_steps as f64) * config.warmup_ratio).ceil() as usize,
        total_steps,
        min_ratio: 0.1,
    };
    let mut optimizer = AdamW::new(config.optimizer.clone(), &t.vars)?;

    let mut state = LoopState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: config.seed,
        losses: Vec::new(),
        trained_tokens: 0,
    };
    if let Some(dir) = &config.checkpoint_dir {
        if checkpoint::exists(dir)? {
            state = checkpoint::load(dir, &t.names, &t.vars, &mut optimizer)?;
            tracing::info!(
                step = state.step,
                epoch = state.epoch,
                "resumed from checkpoint {}",
                dir.display()
            );
            observer.on_checkpoint(state.step, dir, &t.frozen);
        }
    }
    let save = |state: &LoopState, optimizer: &AdamW, observer: &mut dyn Observer| -> Result<()> {
        if let Some(dir) = &config.checkpoint_dir {
            checkpoint::save(dir, &t.names, &t.vars, optimizer, state)?;
            observer.on_checkpoint(state.step, dir, &t.frozen);
        }
        Ok(())
    };

    let mut validation_loss = None;
    let mut cancelled = false;
    'epochs: while state.epoch < config.epochs {
        let batches = length_batches(
            &lengths,
            config.batch_size,
            config.seed.wrapping_add(state.epoch as u64),
        );
        let groups: Vec<&[Vec<usize>]> = batches.chunks(config.grad_accum.max(1)).collect();
        while state.batch_in_epoch < groups.len() {
            if observer.cancelled() {
                // Saved, so a paused run resumes exactly here.
                save(&state, &optimizer, observer)?;
                cancelled = true;
                break 'epochs;
            }
            let started = Instant::now();
            let group = groups[state.batch_in_epoch];
            let parts: Vec<(Batch, usize, usize)> = group
                .iter()
                .map(|ix| batch_of(train, ix, pad_id, &device, teacher))
                .collect::<Result<_>>()?;
            let trained: usize = parts.iter().map(|p| p.1).sum();
            let tokens: usize = parts.iter().map(|p| p.2).sum();
            let mut grads = Grads::new(t.vars.len());
            let mut loss = 0.0;
            for (batch, _, _) in &parts {
                let out = loss_and_grads(
                    &t,
                    batch,
                    config.strategy,
                    trained.max(1) as f64,
                    config.exact,
                )?;
                loss += out.loss;
                grads.add(out.grads)?;
            }
            if !loss.is_finite() {
                bail!(
                    "loss became {loss} at step {}: stopping; the last good checkpoint{} is kept (lower the learning rate)",
                    state.step + 1,
                    config.checkpoint_dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
                );
            }
            let lr = config.optimizer.lr * schedule.factor(state.step);
            let stats = optimizer.update(&t.vars, &grads, lr)?;
            state.step += 1;
            state.batch_in_epoch += 1;
            state.trained_tokens += trained;
            state.losses.push((state.step, loss));
            observer.on_step(&StepMetrics {
                step: state.step,
                total_steps,
                epoch: state.epoch,
                loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                trained_tokens: state.trained_tokens,
                peak_memory_bytes: peak_memory_bytes(),
            });
            if config.checkpoint_every > 0 && state.step.is_multiple_of(config.checkpoint_every) {
                save(&state, &optimizer, observer)?;
            }
        }
        if !validation.is_empty() {
            let v = evaluate(&t, validation, config, pad_id, teacher)?;
            observer.on_validation(state.epoch, state.step, v);
            validation_loss = Some(v);
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
        save(&state, &optimizer, observer)?;
    }

    Ok(TrainOutcome {
        model: t.frozen,
        final_loss: state.losses.last().map(|l| l.1),
        validation_loss,
        trained_tokens: state.trained_tokens,
        steps: state.step,
        cancelled,
    })
}
