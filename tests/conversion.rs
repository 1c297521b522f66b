//! Conversion: step 0 is the original network, stages train through the reversible backward and
//! resume, deltas round-trip, and the evaluation metrics behave on known cases.

mod common;

use candle_core::{Device, Tensor};
use rewind::convert::{self, eval, ConvertConfig, TrainedWeights};
use rewind::model::loader::{self, delta, LoadOptions};
use rewind::train::data::TokenizedExample;
use rewind::train::trainer::{Observer, StepMetrics};

struct Quiet;
impl Observer for Quiet {
    fn on_step(&mut self, _: &StepMetrics) {}
}

fn prompt_ids() -> Vec<u32> {
    vec![
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ]
}

/// midpoint(a = 0) is the original network: conversion's step 0 reproduces its logits.
#[test]
fn step_zero_reproduces_the_original() {
    let original = loader::load(&common::base_model(), &LoadOptions::default())
        .unwrap()
        .model;
    let zero = convert::step_zero(&original);
    assert!(zero
        .reversible
        .two_step(0)
        .is_some_and(|s| s.a == 0.0 && s.b == 1.0 && s.c == 1.0));
    let ids = Tensor::new(&prompt_ids()[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let diff = common::max_abs_diff(
        &original.forward(&ids).unwrap(),
        &zero.forward(&ids).unwrap(),
    );
    assert!(diff <= 1e-4, "step 0 differs from the original by {diff}");
}

/// KL of a model against itself is 0 with full agreement; a stage scheme is measurably apart.
#[test]
fn evaluation_metrics_on_known_cases() {
    let original = loader::load(&common::base_model(), &LoadOptions::default())
        .unwrap()
        .model;
    let examples = vec![TokenizedExample {
        ids: prompt_ids(),
        weights: vec![1.0; 16],
    }];
    let (kl, ce, ce_ref, top1, n) =
        eval::distribution_stats(&original, &original, &examples).unwrap();
    assert_eq!(n, 15);
    assert!(
        kl.abs() < 1e-6 && (ce - ce_ref).abs() < 1e-9 && top1 == 1.0,
        "{kl} {ce} {ce_ref} {top1}"
    );
    let mut stage = original.clone();
    stage.reversible = convert::stage_scheme(3);
    let (kl, _, _, top1, _) = eval::distribution_stats(&stage, &original, &examples).unwrap();
    assert!(kl > 1e-4 && top1 < 1.0 + 1e-9, "{kl} {top1}");
    let exact = eval::exact_rebuild_check(&stage, &prompt_ids())
        .unwrap()
        .unwrap();
    assert_eq!(
        exact,
        (true, 3.0),
        "a = -1/8 rebuilds bit for bit with 3 kept bits"
    );
}

/// A one-stage, norms-only conversion lowers the KL to the teacher, writes a delta that reloads
/// to the same model, and a second run resumes from the finished stage instead of retraining.
#[test]
fn conversion_stage_trains_saves_and_resumes() {
    let spec = convert_save_and_resume(TrainedWeights::Norms);
    assert_eq!(spec.lora, None);
    assert_eq!(spec.parameters, 61 * 576, "the 61 norm gains");
}

/// The same with LoRA adapters on every projection: the delta holds the norm gains and the
/// adapters' factors, and reloads (adapters folded into the base weights) to the same logits.
#[test]
fn lora_conversion_writes_adapter_factors_that_reload() {
    let spec = convert_save_and_resume(TrainedWeights::Lora);
    let lora = spec.lora.expect("the manifest records the adapters");
    assert_eq!((lora.rank, lora.targets.len()), (4, 7));
    // Per layer and rank: q, o (576+576), k, v (576+192), gate, up, down (576+1536).
    let factors = 30 * 4 * (2 * 1152 + 2 * 768 + 3 * 2112);
    assert_eq!(spec.parameters, 61 * 576 + factors);
}

fn convert_save_and_resume(weights: TrainedWeights) -> delta::DeltaManifest {
    let dir = tempfile::tempdir().unwrap();
    let loaded = loader::load(&common::base_model(), &LoadOptions::default()).unwrap();
    let teacher = loaded.model.clone();
    let examples: Vec<TokenizedExample> = (0..4)
        .map(|i| TokenizedExample {
            ids: prompt_ids()
                .iter()
                .map(|&t| if t > 2 { t + i } else { t })
                .collect(),
            weights: vec![1.0; 16],
        })
        .collect();
    let config = ConvertConfig {
        stages: vec![2],
        tokens_per_stage: 192,
        batch_size: 4,
        lr: 1e-3,
        weights,
        lora_rank: 4,
        lora_alpha: 8.0,
        seed: 0,
    };
    let work = dir.path().join("work");
    let mut before = teacher.clone();
    before.reversible = convert::stage_scheme(2);
    let (kl_before, ..) = eval::distribution_stats(&before, &teacher, &examples).unwrap();
    let mut student = convert::convert(
        &teacher,
        &examples,
        &[],
        2,
        &config,
        &work,
        &mut Quiet,
        |_, _| Ok(()),
    )
    .unwrap();
    let (kl_after, ..) = eval::distribution_stats(&student, &teacher, &examples).unwrap();
    println!("KL to the teacher at a = -1/4: {kl_before:.4} -> {kl_after:.4}");
    assert!(kl_after < kl_before);

    // The delta (norm gains + scheme) reloads to the same logits.
    let base_dir = dir.path().join("models");
    std::fs::create_dir_all(&base_dir).unwrap();
    let base = base_dir.join("base.gguf");
    std::fs::copy(common::base_model(), &base).unwrap();
    let delta_dir = base_dir.join("converted.delta");
    delta::save(&mut student, &base, &config.delta_contents(), &delta_dir).unwrap();
    let reloaded = loader::load(&delta_dir, &LoadOptions::default())
        .unwrap()
        .model;
    let ids = Tensor::new(&prompt_ids()[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let diff = common::max_abs_diff(
        &student.forward(&ids).unwrap(),
        &reloaded.forward(&ids).unwrap(),
    );
    // Folded into the f32 weights, adapters round differently than applied apart (logits ~10).
    assert!(diff < 1e-3, "{diff}");

    // Resuming finds the finished stage and reloads it.
    let again = convert::convert(
        &teacher,
        &examples,
        &[],
        2,
        &config,
        &work,
        &mut Quiet,
        |_, _| Ok(()),
    )
    .unwrap();
    let diff = common::max_abs_diff(
        &again.forward(&ids).unwrap(),
        &student.forward(&ids).unwrap(),
    );
    assert!(diff < 1e-5, "{diff}");
    delta::manifest(&delta_dir).unwrap()
}

#[test]
fn teacher_answers_are_generated_once_then_read_back() {
    use rewind::convert::teacher_answers::load_or_generate;
    use rewind::train::data::Example;
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let (tmp, dir) = common::write_tiny_model("chatml", template);
    let teacher = loader::load(&dir, &LoadOptions::default()).unwrap();
    let cache = tmp.path().join("work").join("answers.jsonl");
    let prompts = ["Hi there.", "Name a colour."];
    let answers = load_or_generate(&teacher, &prompts, 4, &cache).unwrap();
    assert_eq!(answers.len(), 2);
    for (answer, prompt) in answers.iter().zip(prompts) {
        let Example::Chat(messages) = answer else {
            panic!("answers are chats")
        };
        assert_eq!(
            (messages[0].role.as_str(), messages[0].content.as_str()),
            ("user", prompt)
        );
        assert_eq!(messages[1].role, "assistant");
    }
    // A second run reads the cache instead of generating again.
    let edited = std::fs::read_to_string(&cache)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["messages"][1]["content"] = "cached".into();
            v.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cache, edited).unwrap();
    let again = load_or_generate(&teacher, &prompts, 4, &cache).unwrap();
    for answer in again {
        let Example::Chat(messages) = answer else {
            panic!("answers are chats")
        };
        assert_eq!(messages[1].content, "cached");
    }
}
