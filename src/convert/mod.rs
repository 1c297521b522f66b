//! Conversion: a pretrained (forward Euler) decoder becomes a reversible one that still answers
//! like the original, by distillation through the reversible backward.
//!
//! The method is a homotopy in the blend a of midpoint(a):
//!     p_{j+1} = a p_{j-1} + (1 - a) p_j + f_j(p_j)
//! At a = 0 this is exactly the original network (step 0 reproduces its logits); with
//! a = -2^-k the exact (fixed-point) mode inverts it bit for bit while keeping k bits per
//! element per layer. Stages walk a through -2^-k for decreasing k, each distilling the
//! original's output distribution into the student, towards a = -1 where nothing is kept.

pub mod eval;
pub mod teacher_answers;

use crate::model::block::PROJECTION_NAMES;
use crate::model::decoder::Model;
use crate::model::loader::delta::{self, DeltaContents, LoraSpec};
use crate::model::reversible::{Blend, ReversibleConfig, SchemeKind};
use crate::train::backward::Strategy;
use crate::train::data::TokenizedExample;
use crate::train::exact::FixedPoint;
use crate::train::optimizer::AdamWConfig;
use crate::train::trainer::{self, Observer, TrainConfig};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which weights conversion trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainedWeights {
    /// RMSNorm gains only: a tiny delta (~35k parameters for SmolLM2).
    Norms,
    /// RMSNorm gains and LoRA adapters on every projection (`ConvertConfig::lora_rank`): a
    /// delta of a few MB that can still move every matrix.
    Lora,
    /// Every weight.
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConvertConfig {
    /// The k of each stage's blend a = -2^-k, in order (k in 0..=8; 0 means a = -1).
    pub stages: Vec<u32>,
    /// Distillation tokens per stage (0: no training, only the scheme change).
    pub tokens_per_stage: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weights: TrainedWeights,
    /// Rank and alpha of the adapters under `TrainedWeights::Lora`.
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub seed: u64,
}

impl ConvertConfig {
    /// What the delta of this conversion stores.
    pub fn delta_contents(&self) -> DeltaContents {
        match self.weights {
            TrainedWeights::Norms => DeltaContents::Norms,
            TrainedWeights::Lora => DeltaContents::NormsAndAdapters(LoraSpec {
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                targets: PROJECTION_NAMES.iter().map(|t| t.to_string()).collect(),
            }),
            TrainedWeights::Full => DeltaContents::All,
        }
    }
}

/// The scheme of a stage: midpoint(a = -2^-k), h = 1, duplicate seeding, read-out p_L.
pub fn stage_scheme(k: u32) -> ReversibleConfig {
    let mut scheme = ReversibleConfig::euler();
    scheme.scheme = SchemeKind::MidpointA;
    scheme.a = Blend::Constant(-(0.5f64).powi(k as i32));
    scheme
}

/// The `midpoint(a = 0)` form of `model`: the original network written as a two-step scheme.
pub fn step_zero(model: &Model) -> Model {
    let mut m = model.clone();
    let mut scheme = stage_scheme(0);
    scheme.a = Blend::Constant(0.0);
    m.reversible = scheme;
    m
}

/// Examples from `data`, cycling from `offset`, until `tokens` tokens are gathered.
fn take_tokens(
    data: &[TokenizedExample],
    offset: usize,
    tokens: usize,
) -> (Vec<TokenizedExample>, usize) {
    let mut out = Vec::new();
    let (mut count, mut i) = (0, offset);
    while count < tokens && !data.is_empty() {
        let ex = &data[i % data.len()];
        count += ex.ids.len();
        out.push(ex.clone());
        i += 1;
    }
    (out, i)
}

#[allow(clippy::too_many_arguments)]
/// Runs (or resumes) every stage; `work_dir` keeps per-stage checkpoints and results.
/// `on_stage(k, model)` is called after each stage with its model.
pub fn convert(
    teacher: &Model,
    data: &[TokenizedExample],
    validation: &[TokenizedExample],
    pad_id: u32,
    config: &ConvertConfig,
    work_dir: &Path,
    observer: &mut dyn Observer,
    mut on_stage: impl FnMut(u32, &Model) -> Result<()>,
) -> Result<Model> {
    if config.stages.is_empty() {
        bail!("no conversion stages");
    }
    if let Some(k) = config.stages.iter().find(|&&k| k > 8) {
        bail!("stage k = {k}: exact mode keeps at most 8 bits (a = -2^-8)");
    }
    std::fs::create_dir_all(work_dir)?;
    let contents = config.delta_contents();
    let mut student = teacher.clone();
    if let DeltaContents::NormsAndAdapters(lora) = &contents {
        student.densify()?;
        student.add_lora(lora.rank, lora.alpha, &lora.targets, config.seed)?;
    }
    let mut offset = 0;
    for (i, &k) in config.stages.iter().enumerate() {
        student.reversible = stage_scheme(k);
        let done = work_dir.join(format!("stage-{i}.safetensors"));
        let (examples, next) = take_tokens(data, offset, config.tokens_per_stage);
        offset = next;
        if done.exists() {
            delta::apply(&mut student, &done)?;
            tracing::info!(stage = i, k, "stage already converted, reloaded");
        } else if config.tokens_per_stage > 0 {
            let train_config = TrainConfig {
                strategy: Strategy::Reversible,
                exact: Some(FixedPoint::default()),
                epochs: 1,
                batch_size: config.batch_size,
                optimizer: AdamWConfig {
                    lr: config.lr,
                    ..Default::default()
                },
                warmup_ratio: 0.05,
                seed: config.seed.wrapping_add(i as u64),
                train_only: match config.weights {
                    TrainedWeights::Norms => vec!["norm".into()],
                    TrainedWeights::Lora => vec!["norm".into(), ".lora_".into()],
                    TrainedWeights::Full => Vec::new(),
                },
                checkpoint_dir: Some(work_dir.join(format!("stage-{i}.checkpoint"))),
                checkpoint_every: 20,
                grad_accum: 1,
                // Distillation also holds the teacher, which the probe does not see.
                batch_rule: None,
            };
            let outcome = trainer::train(
                student,
                &examples,
                validation,
                pad_id,
                &train_config,
                Some(teacher),
                observer,
            )?;
            if outcome.cancelled {
                bail!("conversion cancelled during stage {i}; run again to resume");
            }
            student = outcome.model;
            delta::write_weights(&mut student, &contents, &done)?;
            let _ = std::fs::remove_dir_all(work_dir.join(format!("stage-{i}.checkpoint")));
        }
        on_stage(k, &student)?;
    }
    Ok(student)
}

/// Where `rewind convert` keeps its stages for `output`.
pub fn work_dir(output: &Path) -> PathBuf {
    output.with_extension("work")
}
