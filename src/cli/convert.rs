//! `rewind convert` and `rewind eval`.

use crate::cli::progress::StepProgress;
use crate::cli::ModelArgs;
use crate::convert::eval::{self, EvalReport};
use crate::convert::{self, teacher_answers, ConvertConfig, TrainedWeights};
use crate::model::loader::{LoadedModel, WeightFormat};
use crate::train::data::{self, TokenizedExample};
use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model to compare against (default: the original default model). Without --model,
    /// the model evaluated is the converted default model.
    #[arg(long)]
    pub reference: Option<String>,
    /// Weight format of the reference (default: the evaluated model's `--format`), e.g.
    /// `--format quantized --reference-format f32` measures what quantisation costs.
    #[arg(long, value_enum)]
    pub reference_format: Option<WeightFormat>,
    /// Held-out chat JSONL (default: rewind's held-out chitchat slice).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokens of each greedy answer (0: skip the answers).
    #[arg(long, default_value_t = 48)]
    pub answer_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

fn tokenize_all(
    loaded: &LoadedModel,
    examples: &[data::Example],
    max_len: usize,
) -> Result<Vec<TokenizedExample>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            data::fit_length(
                data::tokenize(e, &loaded.chat_template, &loaded.tokenizer)?,
                max_len,
                data::Overflow::Truncate,
                i,
            )
        })
        .collect()
}

fn heldout(path: Option<&Path>) -> Result<Vec<data::Example>> {
    match path {
        Some(p) => data::read_jsonl(p),
        None => data::parse_jsonl(eval::HELDOUT_CHITCHAT)
            .map_err(|e| anyhow::anyhow!("built-in held-out data: {e:?}")),
    }
}

pub fn print_report(report: &EvalReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!("model      {} ({})", report.model, report.scheme);
    println!("reference  {}", report.reference);
    println!("tokens     {}", report.tokens);
    println!("KL(reference || model)  {:.4} nats/token", report.kl);
    println!(
        "CE model / reference    {:.4} / {:.4}",
        report.ce, report.ce_reference
    );
    println!(
        "top-1 agreement         {:.1}%",
        100.0 * report.top1_agreement
    );
    if let Some(e) = report.reconstruction_error {
        println!("float inverse error     {e:.2e} (max relative, all layers down)");
    }
    if let (Some(ok), Some(bits)) = (
        report.exact_rebuild_bit_exact,
        report.exact_bits_per_element_per_layer,
    ) {
        println!(
            "exact-mode rebuild      {} ({bits} kept bits per element per layer)",
            if ok { "bit-exact" } else { "NOT bit-exact" }
        );
    }
    for a in &report.answers {
        println!(
            "\n> {}\n  model:     {}\n  reference: {}",
            a.prompt,
            a.model.replace('\n', " "),
            a.reference.replace('\n', " ")
        );
    }
    Ok(())
}

pub fn run_eval(args: EvalArgs) -> Result<()> {
    // With no --model, the converted default model is compared with the original.
    let model_args = ModelArgs {
        model: Some(
            args.model
                .model
                .clone()
                .unwrap_or_else(|| crate::provision::DEFAULT_MODEL.into()),
        ),
        ..args.model.clone()
    };
    // Measured on the path that serves it (the CPU decode kernels where they apply).
    let model = model_args.load_for_inference()?;
    let reference = ModelArgs {
        model: Some(
            args.reference
                .clone()
                .unwrap_or_else(|| crate::provision::BASE_MODEL.into()),
        ),
        scheme: None,
        format: args.reference_format.unwrap_or(args.model.format),
        ..args.model.clone()
    }
    .load()?;
    let examples = tokenize_all(&reference, &heldout(args.data.as_deref())?, 1024)?;
    let report = eval::compare(&model, &reference, &examples, args.answer_tokens)?;
    print_report(&report, args.json)
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The pretrained model to convert (default: the original default model).
    #[arg(long = "from")]
    pub from: Option<String>,
    /// The blend exponents k of the stages, a = -2^-k in order (0 means a = -1).
    #[arg(long, value_delimiter = ',', default_value = "3")]
    pub stages: Vec<u32>,
    /// Distillation tokens per stage.
    #[arg(long, default_value_t = 20_000)]
    pub tokens: usize,
    /// Chat JSONL to distil on (default: the chitchat dataset, fetched from PyPI).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also distil on the original's own greedy answers (at most this many tokens each) to
    /// rewind's instruction prompts, spread through the data; 0 (the default: measured worse
    /// on held-out chat, see docs/benchmarks.md) leaves them out.
    #[arg(long, default_value_t = 0)]
    pub answer_tokens: usize,
    #[arg(long, value_enum, default_value = "norms")]
    pub weights: TrainedWeights,
    /// Rank of the adapters under `--weights lora` (on every projection).
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Learning rate (default: 2e-3 for norms; 2e-4 for LoRA and full weights, where 2e-3 made
    /// the held-out KL worse than no training).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run on the GPU (requires a build with `--features cuda`).
    #[arg(long)]
    pub cuda: bool,
    /// Output: a delta directory (trained weights + scheme) over the base model file.
    #[arg(long, default_value = "models/converted.delta")]
    pub output: PathBuf,
}

pub fn run_convert(args: ConvertArgs) -> Result<()> {
    // Resolved (and verified) once; the teacher then loads from the path itself.
    let base_path =
        crate::provision::resolve(args.from.as_deref().or(Some(crate::provision::BASE_MODEL)))?;
    let teacher = ModelArgs {
        model: Some(base_path.display().to_string()),
        format: Default::default(),
        scheme: None,
        cuda: args.cuda,
    }
    .load()?;
    let work = convert::work_dir(&args.output);
    let answers = if args.answer_tokens == 0 {
        Vec::new()
    } else {
        let examples = teacher_answers::load_or_generate(
            &teacher,
            &teacher_answers::instruction_prompts(),
            args.answer_tokens,
            &work.join(format!("teacher_answers_{}.jsonl", args.answer_tokens)),
        )?;
        tokenize_all(&teacher, &examples, args.seq_len)?
    };
    let text = match &args.data {
        Some(path) => data::read_jsonl(path)?,
        None => crate::provision::chitchat_examples()?,
    };
    // Tokenise only as much text as the stages consume besides the answers.
    let answer_tokens: usize = answers.iter().map(|e| e.ids.len()).sum();
    let text_budget = (args.tokens * args.stages.len()).saturating_sub(answer_tokens);
    let mut text_examples = Vec::new();
    let mut tokens = 0;
    for (i, example) in text.iter().enumerate() {
        if tokens >= text_budget && !text_examples.is_empty() {
            break;
        }
        let ex = data::fit_length(
            data::tokenize(example, &teacher.chat_template, &teacher.tokenizer)?,
            args.seq_len,
            data::Overflow::Truncate,
            i,
        )?;
        tokens += ex.ids.len();
        text_examples.push(ex);
    }
    let train = teacher_answers::interleave(text_examples, answers);
    let validation = tokenize_all(&teacher, &heldout(None)?, args.seq_len)?;
    let config = ConvertConfig {
        stages: args.stages.clone(),
        tokens_per_stage: args.tokens,
        batch_size: args.batch_size,
        lr: args.lr.unwrap_or(match args.weights {
            TrainedWeights::Norms => 2e-3,
            TrainedWeights::Lora | TrainedWeights::Full => 2e-4,
        }),
        weights: args.weights,
        lora_rank: args.lora_rank,
        lora_alpha: args.lora_alpha,
        seed: args.seed,
    };
    let mut progress = StepProgress::new("KL");
    let pad = teacher.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let mut student = convert::convert(
        &teacher.model,
        &train,
        &validation,
        pad,
        &config,
        &work,
        &mut progress,
        |k, m| {
            let (kl, _, _, top1, _) = eval::distribution_stats(m, &teacher.model, &validation)?;
            let line = format!(
                "stage a = -2^-{k}: held-out KL {kl:.4}, top-1 agreement {:.1}%",
                100.0 * top1
            );
            tracing::info!("{line}");
            Ok(())
        },
    )?;
    progress.finish();
    crate::model::loader::delta::save(
        &mut student,
        &base_path,
        &config.delta_contents(),
        &args.output,
    )?;
    let converted = crate::model::loader::load(
        &args.output,
        &crate::model::loader::LoadOptions {
            device: teacher.model.device.clone(),
            ..Default::default()
        },
    )?;
    let report = eval::compare(&converted, &teacher, &validation, 48)?;
    std::fs::write(
        args.output.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    print_report(&report, false)?;
    println!("\nconverted model written to {}", args.output.display());
    Ok(())
}
