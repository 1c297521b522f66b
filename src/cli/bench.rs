//! `rewind bench train|generate`: the numbers in docs/benchmarks.md.

use crate::cli::ModelArgs;
use crate::memory;
use crate::memory::phases::{self, PhasePeaks};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::decoder::SeqInput;
use crate::model::kv_cache::KvCache;
use crate::model::loader::{self, random::RandomSource, WeightFormat};
use crate::model::reversible::ReversibleConfig;
use crate::train::backward::{loss_and_grads, Batch, Strategy};
use crate::train::exact::{self, FixedPoint};
use crate::train::memory_fit::synthetic_batch;
use crate::train::trainable::Trainable;
use anyhow::{bail, Result};
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Training step time and activation memory per strategy, over a synthetic decoder's depth.
    Train(TrainBenchArgs),
    /// Prefill and decode throughput of a model in each weight format.
    Generate(GenerateBenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainBenchArgs {
    #[arg(long, value_delimiter = ',', default_values_t = vec![8, 16, 32, 64, 96])]
    pub depths: Vec<usize>,
    /// Sequences per step (at least 2: memory per sample is measured from half to full batch).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    #[arg(long, default_value_t = 512)]
    pub d_model: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 50304)]
    pub vocab: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "store,checkpoint,reversible"
    )]
    pub strategies: Vec<Strategy>,
    #[arg(long, default_value = "midpoint")]
    pub scheme: String,
    /// Also measure exact (fixed-point) mode for the reversible strategy.
    #[arg(long)]
    pub exact: bool,
    /// Memory budget for the largest-batch estimate, in GiB.
    #[arg(long, default_value_t = 16.0)]
    pub budget_gib: f64,
    /// Timed steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Benchmark the default model (or --model) instead of the synthetic decoder.
    #[arg(long)]
    pub real_model: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct GenerateBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,quantized")]
    pub formats: Vec<WeightFormat>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8])]
    pub batches: Vec<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: BenchCommand) -> Result<()> {
    if !memory::is_installed() {
        bail!("memory accounting is unavailable in this build");
    }
    match command {
        BenchCommand::Train(args) => bench_train(&args),
        BenchCommand::Generate(args) => bench_generate(&args),
    }
}

#[derive(Serialize)]
struct TrainRow {
    strategy: String,
    scheme: String,
    exact: bool,
    layers: usize,
    batch: usize,
    seq: usize,
    d_model: usize,
    parameters: usize,
    activation_bytes_per_sample: f64,
    /// The phase whose memory grows fastest with the batch (`forward`, `head`, `walk down`).
    peak_phase: &'static str,
    /// Each phase's peak at the full batch.
    phase_peaks: std::collections::BTreeMap<&'static str, usize>,
    /// Exact mode's kept low bits, bits per element per layer.
    buffer_bits_per_element: f64,
    peak_bytes: usize,
    step_seconds: f64,
    tokens_per_s: f64,
    budget_bytes: u64,
    max_batch: u64,
}

fn synthetic_config(args: &TrainBenchArgs, layers: usize) -> ModelConfig {
    ModelConfig {
        model_type: Architecture::Llama,
        hidden_size: args.d_model,
        // SwiGLU at 8/3 d matches a GPT-2 4d MLP's parameter count.
        intermediate_size: (args.d_model * 8 / 3).div_ceil(64) * 64,
        num_hidden_layers: layers,
        num_attention_heads: args.heads,
        num_key_value_heads: args.heads,
        head_dim: None,
        vocab_size: args.vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: args.seq.max(16),
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// The peak memory of each phase (above what was live before) and the seconds of one
/// forward+backward.
fn measure(
    t: &Trainable,
    batch: &Batch,
    strategy: Strategy,
    exact: Option<FixedPoint>,
) -> Result<(PhasePeaks, f64)> {
    let device = batch.inputs.device();
    let started = Instant::now();
    let (out, peaks) = phases::measure(device, || {
        let out = loss_and_grads(t, batch, strategy, 1.0, exact)?;
        device.synchronize()?;
        Ok(out)
    })?;
    let secs = started.elapsed().as_secs_f64();
    drop(out);
    Ok((peaks, secs))
}

fn bench_train(args: &TrainBenchArgs) -> Result<()> {
    let device = if args.model.cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let scheme = ReversibleConfig::parse(&args.scheme)?;
    let depths = if args.real_model {
        vec![0]
    } else {
        args.depths.clone()
    };
    if !args.json {
        println!("strategy    scheme              L   batch seq  act MB/sample  (phase)     step s   tokens/s  max batch@{:.0}GiB", args.budget_gib);
    }
    for layers in depths {
        let model = if args.real_model {
            let mut m = args.model.load()?.model;
            m.reversible = scheme.clone();
            m
        } else {
            let config = synthetic_config(args, layers);
            loader::build_model(
                &config,
                scheme.clone(),
                &RandomSource {
                    seed: 1,
                    separate_head: false,
                },
                args.model.format,
                &device,
            )?
        };
        let layers = model.layers.len();
        let parameters = model.num_parameters();
        let vocab = model.config.vocab_size;
        let t = Trainable::new(model, |_| true)?;
        let mut runs: Vec<(Strategy, Option<FixedPoint>)> =
            args.strategies.iter().map(|&s| (s, None)).collect();
        if args.exact {
            runs.push((Strategy::Reversible, Some(FixedPoint::default())));
        }
        for (strategy, exact) in runs {
            // Per-sample memory is each phase's peak growth from half the batch to the full
            // batch (costs independent of the batch cancel), and the fastest-growing phase's
            // is the step's: see `memory::phases`.
            let half_batch = (args.batch / 2).max(1);
            let full = synthetic_batch(args.batch, args.seq, vocab, &device)?;
            let half = synthetic_batch(half_batch, args.seq, vocab, &device)?;
            measure(&t, &half, strategy, exact)?; // warm-up
            let (peaks_half, _) = measure(&t, &half, strategy, exact)?;
            // The first full-batch step faults in the heap it grows by; it is not timed.
            measure(&t, &full, strategy, exact)?;
            let mut peaks_full = None;
            let mut times = Vec::new();
            for _ in 0..args.steps.max(1) {
                let (peaks, secs) = measure(&t, &full, strategy, exact)?;
                peaks_full.get_or_insert(peaks);
                times.push(secs);
            }
            let peaks_full = peaks_full.expect("at least one step");
            times.sort_by(f64::total_cmp);
            let step_seconds = times[times.len() / 2];
            let cost = if args.batch > half_batch {
                phases::per_sample((half_batch, &peaks_half), (args.batch, &peaks_full))
            } else {
                phases::PerSample {
                    phase: "rest",
                    bytes_per_sample: peaks_full.peak() as f64,
                    fixed_bytes: 0.0,
                }
            };
            // Weights, gradients and two AdamW moments: 16 bytes per f32 parameter.
            let budget = (args.budget_gib * (1u64 << 30) as f64) as u64;
            let available = budget as f64 - 16.0 * parameters as f64 - cost.fixed_bytes.max(0.0);
            let max_batch = if cost.bytes_per_sample > 0.0 && available > 0.0 {
                (available / cost.bytes_per_sample) as u64
            } else {
                0
            };
            let row = TrainRow {
                strategy: format!("{strategy:?}").to_lowercase(),
                scheme: t.graph.reversible.label(),
                exact: exact.is_some(),
                layers,
                batch: args.batch,
                seq: args.seq,
                d_model: t.graph.config.hidden_size,
                parameters,
                activation_bytes_per_sample: cost.bytes_per_sample,
                peak_phase: cost.phase,
                phase_peaks: peaks_full.0.iter().map(|&(n, b)| (n, b)).collect(),
                buffer_bits_per_element: if exact.is_some() {
                    exact::buffer_bits_per_element(&t.graph)?
                } else {
                    0.0
                },
                peak_bytes: peaks_full.peak(),
                step_seconds,
                tokens_per_s: (args.batch * args.seq) as f64 / step_seconds,
                budget_bytes: budget,
                max_batch,
            };
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "{:<11} {:<19} {:<3} {:<5} {:<4} {:>13.2}  {:<10}  {:>6.2}  {:>9.0}  {}",
                    row.strategy.clone() + if row.exact { "+exact" } else { "" },
                    row.scheme,
                    row.layers,
                    row.batch,
                    row.seq,
                    row.activation_bytes_per_sample / 1e6,
                    row.peak_phase,
                    row.step_seconds,
                    row.tokens_per_s,
                    row.max_batch
                );
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct GenerateRow {
    format: String,
    batch: usize,
    prompt_tokens: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    weights_bytes: usize,
    peak_bytes: usize,
}

fn bench_generate(args: &GenerateBenchArgs) -> Result<()> {
    if !args.json {
        println!("format      batch  prefill tok/s  decode tok/s  weights MB  peak MB");
    }
    for &format in &args.formats {
        let before = memory::live_bytes();
        let mut margs = args.model.clone();
        margs.format = format;
        let loaded = margs.load_for_inference()?;
        let weights_bytes = memory::live_bytes().saturating_sub(before);
        let model = &loaded.model;
        let prompt: Vec<u32> = (0..args.prompt_tokens)
            .map(|i| (i as u32 * 7919) % model.config.vocab_size as u32)
            .collect();
        for &batch in &args.batches {
            memory::reset_peak();
            let mut caches: Vec<KvCache> =
                (0..batch).map(|_| KvCache::new(&model.config)).collect();
            let started = Instant::now();
            for cache in caches.iter_mut() {
                model.forward_step(&mut [SeqInput {
                    tokens: &prompt,
                    cache,
                }])?;
            }
            let prefill = (batch * prompt.len()) as f64 / started.elapsed().as_secs_f64();
            let token = [42u32];
            let started = Instant::now();
            for _ in 0..args.decode_tokens {
                let mut inputs: Vec<SeqInput<'_>> = caches
                    .iter_mut()
                    .map(|cache| SeqInput {
                        tokens: &token,
                        cache,
                    })
                    .collect();
                let logits = model.forward_step(&mut inputs)?;
                logits.to_vec2::<f32>()?; // include the device-to-host copy sampling needs
            }
            let decode = (batch * args.decode_tokens) as f64 / started.elapsed().as_secs_f64();
            let row = GenerateRow {
                format: format!("{format:?}").to_lowercase(),
                batch,
                prompt_tokens: prompt.len(),
                prefill_tokens_per_s: prefill,
                decode_tokens_per_s: decode,
                weights_bytes,
                peak_bytes: memory::peak_bytes().saturating_sub(before),
            };
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "{:<11} {:<6} {:>13.0}  {:>12.1}  {:>10.0}  {:>7.0}",
                    row.format,
                    batch,
                    row.prefill_tokens_per_s,
                    row.decode_tokens_per_s,
                    row.weights_bytes as f64 / 1e6,
                    row.peak_bytes as f64 / 1e6
                );
            }
        }
    }
    Ok(())
}
