//! The trainer end to end: it learns (the default model, made reversible, learns a fact), its
//! checkpoints resume the same loss curve, and a diverging run stops with a clear message.

mod common;

use rewind::model::config::{Architecture, ModelConfig};
use rewind::model::decoder::Model;
use rewind::model::generate::{run_to_completion, GenerationParams, Sequence};
use rewind::model::loader::{self, random::RandomSource, LoadOptions, LoadedModel, WeightFormat};
use rewind::model::reversible::ReversibleConfig;
use rewind::model::sampling::SamplingParams;
use rewind::text::chat_template::ChatMessage;
use rewind::train::backward::Strategy;
use rewind::train::data::{self, TokenizedExample};
use rewind::train::exact::FixedPoint;
use rewind::train::optimizer::AdamWConfig;
use rewind::train::trainer::{self, Observer, StepMetrics, TrainConfig};

#[derive(Default)]
struct Record {
    losses: Vec<f64>,
    validation: Vec<f64>,
    stop_after: Option<usize>,
}

impl Observer for Record {
    fn on_step(&mut self, m: &StepMetrics) {
        self.losses.push(m.loss);
    }
    fn on_validation(&mut self, _epoch: usize, _step: usize, loss: f64) {
        self.validation.push(loss);
    }
    fn cancelled(&self) -> bool {
        self.stop_after.is_some_and(|n| self.losses.len() >= n)
    }
}

fn answer(loaded: &LoadedModel, question: &str) -> String {
    let prompt = loaded
        .chat_template
        .render(&[ChatMessage::user(question)], true, None)
        .unwrap();
    let ids = loaded.tokenizer.encode(&prompt, true).unwrap();
    let params = GenerationParams {
        max_tokens: 16,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut seqs = [Sequence::new(&loaded.model, ids, params)];
    let mut text = String::new();
    run_to_completion(&loaded.model, &loaded.tokenizer, &mut seqs, |_, s| {
        text.push_str(&s.text)
    })
    .unwrap();
    text
}

fn tokenized(loaded: &LoadedModel, file: &str) -> Vec<TokenizedExample> {
    data::read_jsonl(&common::fixture(file))
        .unwrap()
        .iter()
        .map(|e| data::tokenize(e, &loaded.chat_template, &loaded.tokenizer).unwrap())
        .collect()
}

/// The default model as midpoint(a = -1/8) (close to the original, exactly invertible with 3
/// kept bits per element per layer) learns a made-up fact with the reversible backward.
#[test]
fn reversible_fine_tuning_learns_a_fact() {
    let scheme = ReversibleConfig::parse("midpoint(a=-0.125)").unwrap();
    let mut loaded = loader::load(
        &common::base_model(),
        &LoadOptions {
            reversible: Some(scheme),
            device: common::device(),
            ..Default::default()
        },
    )
    .unwrap();
    let question = "Could you tell me what the capital of Zorblax is?"; // held out: in the validation file
    let before = answer(&loaded, question);
    assert!(!before.contains("Quintara"), "{before}");
    let (train, validation) = (
        tokenized(&loaded, "facts_train.jsonl"),
        tokenized(&loaded, "facts_validation.jsonl"),
    );
    let pad = loaded.tokenizer.eos_ids[0];
    let config = TrainConfig {
        strategy: Strategy::Reversible,
        exact: Some(FixedPoint::default()),
        epochs: 2,
        batch_size: 4,
        optimizer: AdamWConfig {
            lr: 3e-4,
            ..Default::default()
        },
        ..Default::default()
    };
    let model = loaded.model.clone();
    let t = rewind::train::trainable::Trainable::new(model.clone(), |_| true).unwrap();
    let initial = trainer::evaluate(&t, &validation, &config, pad, None).unwrap();
    drop(t);
    let mut record = Record::default();
    let outcome =
        trainer::train(model, &train, &validation, pad, &config, None, &mut record).unwrap();
    println!(
        "validation loss {initial:.3} -> {:?}; training losses {:?}",
        record.validation, record.losses
    );
    assert!(outcome.validation_loss.unwrap() < initial * 0.5);
    loaded.model = outcome.model;
    let after = answer(&loaded, question);
    println!("before: {before:?}\nafter: {after:?}");
    assert!(after.contains("Quintara"), "{after}");
}

fn tiny_model() -> Model {
    let config = ModelConfig {
        model_type: Architecture::Llama,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: None,
        vocab_size: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
    };
    let scheme = ReversibleConfig::parse("leapfrog(h=0.5)").unwrap();
    loader::build_model(
        &config,
        scheme,
        &RandomSource {
            seed: 7,
            separate_head: false,
        },
        WeightFormat::F32,
        &common::device(),
    )
    .unwrap()
}

fn synthetic_examples() -> Vec<TokenizedExample> {
    (0..8u32)
        .map(|i| {
            let ids: Vec<u32> = (0..6 + i as usize)
                .map(|k| (i * 7 + k as u32 * 3) % 64)
                .collect();
            let weights = (0..ids.len())
                .map(|k| if k > 2 { 1.0 } else { 0.0 })
                .collect();
            TokenizedExample { ids, weights }
        })
        .collect()
}

/// A run interrupted after 3 steps and resumed from its checkpoint continues exactly the loss
/// curve of an uninterrupted run.
#[test]
fn resumed_run_continues_the_same_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let examples = synthetic_examples();
    let config = |checkpoint: Option<std::path::PathBuf>| TrainConfig {
        strategy: Strategy::Reversible,
        epochs: 3,
        batch_size: 4,
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        checkpoint_dir: checkpoint,
        checkpoint_every: 1,
        ..Default::default()
    };
    let mut full = Record::default();
    trainer::train(
        tiny_model(),
        &examples,
        &[],
        0,
        &config(None),
        None,
        &mut full,
    )
    .unwrap();
    assert_eq!(full.losses.len(), 6);

    let ckpt = dir.path().join("run.checkpoint");
    let mut first = Record {
        stop_after: Some(3),
        ..Default::default()
    };
    let outcome = trainer::train(
        tiny_model(),
        &examples,
        &[],
        0,
        &config(Some(ckpt.clone())),
        None,
        &mut first,
    )
    .unwrap();
    assert!(outcome.cancelled);
    let mut second = Record::default();
    trainer::train(
        tiny_model(),
        &examples,
        &[],
        0,
        &config(Some(ckpt)),
        None,
        &mut second,
    )
    .unwrap();
    let resumed: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(
        resumed, full.losses,
        "resumed curve must equal the uninterrupted one"
    );
}

/// A diverging run stops with a message that names the step and keeps the last checkpoint.
#[test]
fn non_finite_loss_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        strategy: Strategy::Checkpoint,
        epochs: 20,
        batch_size: 4,
        optimizer: AdamWConfig {
            lr: 1e30,
            max_grad_norm: 0.0,
            ..Default::default()
        },
        checkpoint_dir: Some(dir.path().join("ckpt")),
        checkpoint_every: 1,
        warmup_ratio: 0.0,
        ..Default::default()
    };
    let err = trainer::train(
        tiny_model(),
        &synthetic_examples(),
        &[],
        0,
        &config,
        None,
        &mut Record::default(),
    )
    .err()
    .expect("diverges");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("loss became") || msg.contains("gradient norm is"),
        "{msg}"
    );
    assert!(
        dir.path().join("ckpt").join("state.json").exists(),
        "the last good checkpoint is kept"
    );
}

/// LoRA: only the adapters train (frozen weights get no gradient and do not move), and merging
/// the adapters into the weights leaves the function unchanged.
#[test]
fn lora_trains_only_adapters_and_merges_exactly() {
    let mut model = tiny_model();
    let base_q = model.layers[0]
        .self_attn
        .q_proj
        .weight
        .to_dense(candle_core::DType::F32)
        .unwrap();
    let attached = model
        .add_lora(4, 8.0, &["q_proj".into(), "v_proj".into()], 0)
        .unwrap();
    assert_eq!(attached, 2 * model.layers.len());
    let config = TrainConfig {
        strategy: Strategy::Reversible,
        epochs: 2,
        batch_size: 4,
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        train_only: vec!["lora_".into()],
        ..Default::default()
    };
    let outcome = trainer::train(
        model,
        &synthetic_examples(),
        &[],
        0,
        &config,
        None,
        &mut Record::default(),
    )
    .unwrap();
    let mut trained = outcome.model;
    let q = &trained.layers[0].self_attn.q_proj;
    let diff = common::max_abs_diff;
    assert_eq!(
        diff(
            &q.weight.to_dense(candle_core::DType::F32).unwrap(),
            &base_q
        ),
        0.0,
        "the frozen weight did not move"
    );
    assert!(
        q.lora
            .as_ref()
            .unwrap()
            .b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "the adapter trained"
    );
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 13]], &trained.device).unwrap();
    let before = trained.forward(&ids).unwrap();
    trained.merge_lora().unwrap();
    assert!(trained.layers[0].self_attn.q_proj.lora.is_none());
    assert!(diff(&before, &trained.forward(&ids).unwrap()) < 1e-5);
}
