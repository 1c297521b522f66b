//! `rewind train`: fine-tune a model on a JSONL file and write a model directory.

use crate::cli::progress::StepProgress;
use crate::cli::ModelArgs;
use crate::model::loader::save::save_model;
use crate::train::backward::Strategy;
use crate::train::data::{self, fit_length, Overflow};
use crate::train::exact::{self, FixedPoint};
use crate::train::optimizer::AdamWConfig;
use crate::train::trainer::{self, TrainConfig};
use anyhow::{bail, Result};
use candle_core::DType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training data: chat JSONL (`{"messages": [...]}`) or prompt/completion JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data; without it, `--val-fraction` of the training data is held out.
    #[arg(long)]
    pub validation: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Backward strategy: reversible (activation-free; needs a reversible scheme), checkpoint or store.
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// LoRA rank (0 = full fine-tuning).
    #[arg(long, default_value_t = 0)]
    pub lora: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated projections that get LoRA adapters.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub lora_targets: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// What to do with longer examples.
    #[arg(long, value_enum, default_value = "truncate")]
    pub overflow: Overflow,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep float residual streams in the reversible backward instead of exact fixed point
    /// (exact mode is the default wherever the scheme allows it: float rebuilds drift).
    #[arg(long)]
    pub float_residual: bool,
    /// Output model directory.
    #[arg(long, default_value = "models/finetuned")]
    pub output: PathBuf,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let model = loaded.model;
    let strategy = args
        .strategy
        .unwrap_or(if model.reversible.is_reversible() {
            Strategy::Reversible
        } else {
            Strategy::Checkpoint
        });
    let mut examples = data::read_jsonl(&args.data)?;
    let mut validation = match &args.validation {
        Some(path) => data::read_jsonl(path)?,
        None => {
            let held = ((examples.len() as f64) * args.val_fraction).floor() as usize;
            examples.split_off(examples.len() - held.min(examples.len().saturating_sub(1)))
        }
    };
    let tokenize = |list: &mut Vec<data::Example>| -> Result<Vec<data::TokenizedExample>> {
        list.drain(..)
            .enumerate()
            .map(|(i, e)| {
                fit_length(
                    data::tokenize(&e, &loaded.chat_template, &loaded.tokenizer)?,
                    args.seq_len,
                    args.overflow,
                    i,
                )
            })
            .collect()
    };
    let train_set = tokenize(&mut examples)?;
    let val_set = tokenize(&mut validation)?;

    let mut model = model;
    let mut train_only = Vec::new();
    if args.lora > 0 {
        let targets: Vec<String> = args
            .lora_targets
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        model.densify()?;
        if model.add_lora(args.lora, args.lora_alpha, &targets, args.seed)? == 0 {
            bail!("--lora-targets {} matches no projection", args.lora_targets);
        }
        train_only.push("lora_".into());
    }
    let exact = (strategy == Strategy::Reversible && !args.float_residual)
        .then(|| match exact::unsupported_reason(&model) {
            None => Some(FixedPoint::default()),
            Some(why) => {
                tracing::warn!(
                    "float residual streams ({why}); the rebuilt states will drift slightly"
                );
                None
            }
        })
        .flatten();
    let config = TrainConfig {
        strategy,
        exact,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        optimizer: AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        seed: args.seed,
        train_only,
        checkpoint_dir: Some(args.output.with_extension("checkpoint")),
        // A batch that cannot fit is refused with the estimate before the first step.
        batch_rule: Some(crate::train::memory_fit::BatchRule::Required),
        ..Default::default()
    };
    tracing::info!(
        examples = train_set.len(),
        validation = val_set.len(),
        strategy = ?strategy,
        exact = exact.is_some(),
        scheme = %model.reversible.label(),
        "training"
    );
    let mut progress = StepProgress::new("loss");
    let pad = loaded.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let outcome = trainer::train(
        model,
        &train_set,
        &val_set,
        pad,
        &config,
        None,
        &mut progress,
    )?;
    progress.finish();
    save_model(
        &outcome.model,
        &loaded.tokenizer,
        &loaded.chat_template,
        &args.output,
        DType::F32,
    )?;
    if let Some(dir) = &config.checkpoint_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "trained {} steps on {} tokens; final loss {:.4}{}; model written to {}",
        outcome.steps,
        outcome.trained_tokens,
        outcome.final_loss.unwrap_or(f64::NAN),
        outcome
            .validation_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        args.output.display()
    );
    Ok(())
}
