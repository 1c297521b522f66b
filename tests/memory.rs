//! Activation memory per strategy, measured on the counted heap: the property the reversible
//! strategy exists for. Checkpoint keeps every layer's input, so its per-sample memory grows
//! with depth; reversible keeps the top pair only, so its per-sample memory does not.

use candle_core::Device;
use rewind::memory::phases::{self, PerSample};
use rewind::memory::CountingAlloc;
use rewind::model::config::ModelConfig;
use rewind::model::loader::{build_model, random::RandomSource, WeightFormat};
use rewind::model::reversible::ReversibleConfig;
use rewind::train::backward::{loss_and_grads, Strategy};
use rewind::train::memory_fit::synthetic_batch;
use rewind::train::trainable::Trainable;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

const SEQ: usize = 128;
const VOCAB: usize = 256;

fn trainable(layers: usize) -> Trainable {
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": VOCAB, "max_position_embeddings": SEQ, "tie_word_embeddings": true
    }))
    .unwrap();
    let source = RandomSource {
        seed: 5,
        separate_head: false,
    };
    let scheme = ReversibleConfig::parse("midpoint").unwrap();
    let model = build_model(&config, scheme, &source, WeightFormat::F32, &Device::Cpu).unwrap();
    Trainable::new(model, |_| true).unwrap()
}

/// The counted heap is the process's: one measurement at a time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Per-sample memory from steps at batch 8 and 24 (each after a warm-up step): far enough
/// apart that the few kilobytes a step's timing moves (scratch of parallel tasks) do not count.
fn per_sample(strategy: Strategy, layers: usize) -> PerSample {
    let t = trainable(layers);
    let mut peaks = Vec::new();
    for size in [8, 24] {
        let b = synthetic_batch(size, SEQ, VOCAB, &Device::Cpu).unwrap();
        loss_and_grads(&t, &b, strategy, 1.0, None).unwrap();
        let device = Device::Cpu;
        let (_, p) =
            phases::measure(&device, || loss_and_grads(&t, &b, strategy, 1.0, None)).unwrap();
        peaks.push((size, p));
    }
    phases::per_sample((peaks[0].0, &peaks[0].1), (peaks[1].0, &peaks[1].1))
}

#[test]
fn checkpoint_memory_grows_with_depth_and_reversible_memory_does_not() {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    rewind::memory::mark_installed();
    // One f32 state of a sample: SEQ tokens of width 64.
    let state = (SEQ * 64 * 4) as f64;
    let (shallow, deep) = (2, 24);
    let checkpoint = (
        per_sample(Strategy::Checkpoint, shallow),
        per_sample(Strategy::Checkpoint, deep),
    );
    let reversible = (
        per_sample(Strategy::Reversible, shallow),
        per_sample(Strategy::Reversible, deep),
    );
    // Checkpoint keeps one more state per layer, alive from the forward into the walk down: at
    // 24 layers they outweigh every other per-sample cost (at 2 layers another phase's is the
    // largest, so the growth is less than the 22 states kept).
    let growth = checkpoint.1.bytes_per_sample - checkpoint.0.bytes_per_sample;
    assert!(
        growth >= 10.0 * state,
        "checkpoint {:?} -> {:?}: {:.1} states more",
        checkpoint.0,
        checkpoint.1,
        growth / state
    );
    // Reversible: the same within a state's worth, at 12x the depth.
    let drift = (reversible.1.bytes_per_sample - reversible.0.bytes_per_sample).abs();
    assert!(
        drift <= state,
        "reversible {:?} -> {:?}",
        reversible.0,
        reversible.1
    );
    assert!(
        reversible.1.bytes_per_sample < checkpoint.1.bytes_per_sample / 2.0,
        "reversible {:?}, checkpoint {:?}",
        reversible.1,
        checkpoint.1
    );
}

/// The batch a run may use, from the memory it measures: a batch far beyond the machine's memory
/// is refused before any step with the estimate, and as an upper bound ("auto") it is lowered to
/// the largest that fits, which a second fit then accepts as asked.
#[test]
fn batches_are_fitted_to_the_free_memory() {
    use rewind::train::memory_fit::{fit_batch, BatchRule};
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    rewind::memory::mark_installed();
    let t = trainable(2);
    let huge = 1 << 40;
    let refused = fit_batch(
        &t,
        Strategy::Reversible,
        None,
        SEQ,
        huge,
        BatchRule::Required,
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("does not fit") && refused.contains("at most"),
        "{refused}"
    );
    let fit = fit_batch(&t, Strategy::Reversible, None, SEQ, huge, BatchRule::AtMost)
        .unwrap()
        .expect("memory is measurable here");
    assert!(
        fit.batch > 0 && fit.batch == fit.max_batch && fit.batch < huge,
        "{fit:?}"
    );
    // The probe's two small batches see costs that stop growing at larger ones (an MLP tile
    // that is not yet full), so it may overestimate a sample, never underestimate it much.
    let measured = per_sample(Strategy::Reversible, 2).bytes_per_sample;
    assert!(
        fit.bytes_per_sample >= 0.8 * measured && fit.bytes_per_sample <= 4.0 * measured,
        "probe {} vs {measured}",
        fit.bytes_per_sample
    );
    let again = fit_batch(
        &t,
        Strategy::Reversible,
        None,
        SEQ,
        fit.batch / 2,
        BatchRule::Required,
    )
    .unwrap()
    .unwrap();
    assert_eq!(again.batch, fit.batch / 2);
}
