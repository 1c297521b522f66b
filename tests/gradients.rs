//! Gradient agreement: the reversible and checkpoint backward strategies must give the same
//! parameter and input gradients as ordinary stored-activation autograd (`store`), on the real
//! SmolLM2 blocks at full depth (30 layers), for every reversible scheme.

mod common;

use candle_core::{DType, Device, Tensor};
use rewind::model::loader::{self, LoadOptions};
use rewind::model::reversible::{ReversibleConfig, Seeding};
use rewind::train::backward::{loss_and_grads, Batch, StepGrads, Strategy};
use rewind::train::loss::Targets;
use rewind::train::trainable::Trainable;

fn batch(device: &Device) -> Batch {
    // "<|im_start|>user\nWhat is the capital of France?" (ids from the reference tokenizer)
    let ids: Vec<u32> = vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let inputs = Tensor::new(&ids[..ids.len() - 1], device).unwrap().unsqueeze(0).unwrap();
    let targets = Tensor::new(&ids[1..], device).unwrap();
    let weights = Tensor::new(&[0f32, 0., 1., 1., 1., 1., 1., 1., 1.], device).unwrap();
    Batch { inputs, targets: Targets { ids: targets, weights } }
}

fn grads(scheme: &ReversibleConfig, dtype: DType, strategy: Strategy) -> (StepGrads, Vec<String>) {
    let options = LoadOptions { reversible: Some(scheme.clone()), ..Default::default() };
    let mut model = loader::load(&common::default_model(), &options).unwrap().model;
    model.to_precision(dtype).unwrap();
    let trainable = Trainable::new(model, |_| true).unwrap();
    let out = loss_and_grads(&trainable, &batch(&Device::Cpu), strategy, 7.0, None).unwrap();
    (out, trainable.names)
}

/// ||a - b|| / ||b|| over all parameter gradients and the input gradient together.
fn relative_error(a: &StepGrads, b: &StepGrads) -> f64 {
    let mut diff = 0.0;
    let mut norm = 0.0;
    let pairs = a.grads.grads.iter().zip(&b.grads.grads).map(|(x, y)| (x.clone().unwrap(), y.clone().unwrap()));
    for (x, y) in pairs.chain(std::iter::once((a.grad_embedding.clone(), b.grad_embedding.clone()))) {
        let (x, y) = (x.to_dtype(DType::F64).unwrap(), y.to_dtype(DType::F64).unwrap());
        diff += (&x - &y).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        norm += y.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    }
    (diff / norm).sqrt()
}

fn schemes() -> Vec<ReversibleConfig> {
    let mut euler_seeded = ReversibleConfig::parse("midpoint(h=0.5)").unwrap();
    euler_seeded.seeding = Seeding::EulerStep;
    vec![
        ReversibleConfig::parse("midpoint(h=0.5)").unwrap(),
        euler_seeded,
        ReversibleConfig::parse("midpoint(a=-0.5)").unwrap(),
        ReversibleConfig::parse("leapfrog(h=0.5)").unwrap(),
        ReversibleConfig::parse("hamiltonian").unwrap(),
    ]
}

fn check(dtype: DType, tolerance: f64) {
    for scheme in schemes() {
        let (store, names) = grads(&scheme, dtype, Strategy::Store);
        assert!(store.grads.grads.iter().all(Option::is_some), "every parameter gets a gradient");
        assert_eq!(names.len(), 30 * 9 + 2, "all 30 layers and the embedding/norm are trained");
        for strategy in [Strategy::Checkpoint, Strategy::Reversible] {
            let (other, _) = grads(&scheme, dtype, strategy);
            let err = relative_error(&other, &store);
            println!("{dtype:?} {} {strategy:?}: loss {:.6} vs {:.6}, relative gradient error {err:.3e}", scheme.label(), other.loss, store.loss);
            assert!((other.loss - store.loss).abs() <= tolerance * store.loss.abs().max(1.0));
            assert!(err <= tolerance, "{} {strategy:?} in {dtype:?}: relative error {err:e} > {tolerance:e}", scheme.label());
        }
    }
}

#[test]
fn reversible_and_checkpoint_gradients_match_store_in_f64() {
    check(DType::F64, 1e-10);
}

#[test]
fn reversible_and_checkpoint_gradients_match_store_in_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn reversible_strategy_refuses_euler() {
    let options = LoadOptions::default();
    let model = loader::load(&common::default_model(), &options).unwrap().model;
    let trainable = Trainable::new(model, |_| true).unwrap();
    let err = loss_and_grads(&trainable, &batch(&Device::Cpu), Strategy::Reversible, 7.0, None).err().unwrap().to_string();
    assert!(err.contains("needs a reversible scheme"), "{err}");
}

/// Exact (fixed-point) mode: the reversible walk rebuilds every state bit for bit, so its
/// gradients equal, bit for bit, those of the same walk reading stored states.
#[test]
fn exact_mode_gradients_are_bit_identical_to_stored_states() {
    use rewind::train::exact::FixedPoint;
    for spec in ["midpoint(h=0.5)", "midpoint(a=-0.125)", "leapfrog(h=0.5)", "hamiltonian"] {
        let scheme = ReversibleConfig::parse(spec).unwrap();
        let options = LoadOptions { reversible: Some(scheme.clone()), ..Default::default() };
        let model = loader::load(&common::default_model(), &options).unwrap().model;
        let trainable = Trainable::new(model, |_| true).unwrap();
        let fp = Some(FixedPoint::default());
        let rebuilt = loss_and_grads(&trainable, &batch(&Device::Cpu), Strategy::Reversible, 7.0, fp).unwrap();
        let stored = loss_and_grads(&trainable, &batch(&Device::Cpu), Strategy::Store, 7.0, fp).unwrap();
        assert_eq!(rebuilt.loss.to_bits(), stored.loss.to_bits(), "{spec}");
        for (a, b) in rebuilt.grads.grads.iter().zip(&stored.grads.grads) {
            let (a, b) = (a.as_ref().unwrap().flatten_all().unwrap(), b.as_ref().unwrap().flatten_all().unwrap());
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{spec}: gradients differ");
        }
        // And the fixed-point network is the float network up to its 2^-32 resolution.
        let float = loss_and_grads(&trainable, &batch(&Device::Cpu), Strategy::Store, 7.0, None).unwrap();
        let err = relative_error(&rebuilt, &float);
        println!("{spec}: exact vs float store relative gradient error {err:.3e}");
        assert!(err < 1e-3, "{spec}: {err}");
    }
}
