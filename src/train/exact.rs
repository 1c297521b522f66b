//! Exact mode: residual streams in fixed point so the reversible rebuild is bit-exact whatever
//! f's precision (beyond arXiv 2512.02056; the dropped-bits buffer follows MacKay et al. 2018,
//! "Reversible recurrent neural networks").
//!
//! A state p is held as the integer P = round(p * 2^s) (s = `frac_bits`); f sees the float view
//! P * 2^-s. Integers are carried in f64 tensors, exact while |P| < 2^53, so every device and
//! every candle op works unchanged. For the two-step schemes, with F = round(C f(p_j) 2^s):
//!
//! - |A| = 1 (midpoint, leapfrog, midpoint(a=±1)): P_{j+1} = A P_{j-1} + B P_j + F, an exact
//!   integer sum, undone by P_{j-1} = A (P_{j+1} - B P_j - F).
//! - A = -2^-k (midpoint(a) with a = -1/2, -1/4, ...): A P_{j-1} = -floor(P_{j-1} / 2^k)
//!   drops the k low bits R = P_{j-1} mod 2^k, which are kept (k bits per element per layer,
//!   stored as u8); B P_j = P_j + floor(P_j / 2^k) depends only on P_j, so it is recomputed.
//!   The inverse is P_{j-1} = 2^k (B P_j + F - P_{j+1}) + R.
//!
//! Hamiltonian updates are plain additions and need no buffer. Overflow is detected and
//! refused with a message.

use crate::model::block::Layout;
use crate::model::decoder::{Model, States};
use crate::model::reversible::TwoStep;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Largest integer magnitude an f64 holds exactly.
const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53

/// The fixed-point format: P = round(p * 2^frac_bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FixedPoint {
    pub frac_bits: u32,
}

impl Default for FixedPoint {
    /// 2^-32 resolution keeps |p| up to 2^21 (two million) exact: far above the residual
    /// magnitudes of the models here (~1e2-1e3).
    fn default() -> Self {
        Self { frac_bits: 32 }
    }
}

/// How one two-step layer is carried out on integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExactRule {
    /// A = ±1, B an integer.
    Unit { a: f64, b: f64 },
    /// A = -2^-k, B = 1 + 2^-k.
    DroppedBits { k: u32 },
}

impl ExactRule {
    pub fn for_step(step: &TwoStep) -> Result<Self> {
        if step.a.abs() == 1.0 && step.b.fract() == 0.0 {
            return Ok(Self::Unit {
                a: step.a,
                b: step.b,
            });
        }
        let k = -(-step.a).log2();
        if step.a < 0.0 && k.fract() == 0.0 && (1.0..=8.0).contains(&k) {
            return Ok(Self::DroppedBits { k: k as u32 });
        }
        bail!(
            "exact mode needs a = ±1 or a = -2^-k with 1 <= k <= 8; got a = {}",
            step.a
        )
    }

    /// Bits per element per layer this rule must keep.
    pub fn buffer_bits(&self) -> u32 {
        match self {
            Self::Unit { .. } => 0,
            Self::DroppedBits { k } => *k,
        }
    }
}

impl FixedPoint {
    fn scale(&self) -> f64 {
        (2.0f64).powi(self.frac_bits as i32)
    }

    /// p -> P (f64 integer values).
    pub fn encode(&self, p: &Tensor) -> Result<Tensor> {
        let p = p.to_dtype(DType::F64)?;
        let encoded = (p * self.scale())?.round()?;
        self.check(&encoded, "the embedding")?;
        Ok(encoded)
    }

    /// The float view f sees, in `dtype`.
    pub fn view(&self, integer: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok((integer * (1.0 / self.scale()))?.to_dtype(dtype)?)
    }

    /// round(x * 2^s) of a block output.
    fn quantize_update(&self, x: &Tensor, coefficient: f64) -> Result<Tensor> {
        Ok((x.to_dtype(DType::F64)? * (coefficient * self.scale()))?.round()?)
    }

    fn check(&self, integer: &Tensor, where_: &str) -> Result<()> {
        self.check_peak(integer.abs()?.max_all()?.to_scalar::<f64>()?, where_)
    }

    fn check_peak(&self, max: f64, where_: &str) -> Result<()> {
        if !max.is_finite() || max >= EXACT_LIMIT {
            bail!(
                "fixed-point overflow at {where_}: |p| reached {:.3e}, beyond the exact range {:.3e} of 2^-{} resolution; lower the fraction bits",
                max / self.scale(),
                EXACT_LIMIT / self.scale(),
                self.frac_bits
            );
        }
        Ok(())
    }

    /// P_{j+1} and the dropped bits (u8) of one two-step layer; `f` is f_j(view(P_j)).
    pub fn two_step_forward(
        &self,
        rule: ExactRule,
        c: f64,
        prev: &Tensor,
        cur: &Tensor,
        f: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let update = self.quantize_update(f, c)?;
        let (next, bits) = match rule {
            ExactRule::Unit { a, b } => {
                ((prev.affine(a, 0.0)? + cur.affine(b, 0.0)?)? + update, None)
            }
            ExactRule::DroppedBits { k } => {
                let unit = (1u64 << k) as f64;
                let high = (prev / unit)?.floor()?;
                let low = (prev - (&high * unit)?)?;
                let b_cur = (cur + (cur / unit)?.floor()?)?;
                (((b_cur - high)? + update), Some(low.to_dtype(DType::U8)?))
            }
        };
        Ok((next?, bits))
    }

    /// Rebuilds P_{j-1} from (P_j, P_{j+1}), f_j(view(P_j)) and the kept bits.
    pub fn two_step_inverse(
        &self,
        rule: ExactRule,
        c: f64,
        cur: &Tensor,
        next: &Tensor,
        f: &Tensor,
        bits: Option<&Tensor>,
    ) -> Result<Tensor> {
        let update = self.quantize_update(f, c)?;
        match rule {
            ExactRule::Unit { a, b } => {
                Ok(((next - cur.affine(b, 0.0)?)? - update)?.affine(a, 0.0)?)
            }
            ExactRule::DroppedBits { k } => {
                let unit = (1u64 << k) as f64;
                let Some(bits) = bits else {
                    bail!("exact rebuild needs the kept low bits")
                };
                let b_cur = (cur + (cur / unit)?.floor()?)?;
                let high = ((b_cur + update)? - next)?;
                Ok(((high * unit)? + bits.to_dtype(DType::F64)?)?)
            }
        }
    }

    /// One hamiltonian layer on integers: Q_j = Q_{j-1} + round(h Attn 2^s), P_j = ...
    pub fn hamiltonian_forward(
        &self,
        h: f64,
        q: &Tensor,
        p: &Tensor,
        attn: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
        mlp: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let q_next = (q + self.quantize_update(&attn(&self.view(p, dtype)?)?, h)?)?;
        let p_next = (p + self.quantize_update(&mlp(&self.view(&q_next, dtype)?)?, h)?)?;
        Ok((q_next, p_next))
    }

    /// Exactly undoes [`Self::hamiltonian_forward`] given the two branch outputs.
    pub fn hamiltonian_undo_mlp(&self, h: f64, p: &Tensor, mlp_out: &Tensor) -> Result<Tensor> {
        Ok((p - self.quantize_update(mlp_out, h)?)?)
    }

    pub fn hamiltonian_undo_attn(&self, h: f64, q: &Tensor, attn_out: &Tensor) -> Result<Tensor> {
        Ok((q - self.quantize_update(attn_out, h)?)?)
    }
}

/// The integer states of an exact forward: the top pair, and each layer's kept bits.
pub struct ExactForward {
    pub top: States,
    pub bits: Vec<Option<Tensor>>,
    /// Every layer's input pair, when asked for (the stored-states reference).
    pub stored: Vec<States>,
}

/// Runs `model`'s stack in fixed point from the embedding `e` (float). Seeding by an Euler
/// step is not supported in exact mode (it would not be an integer update of the inputs).
pub fn forward(
    model: &Model,
    fp: &FixedPoint,
    e: &Tensor,
    layout: &mut Layout<'_>,
    keep_states: bool,
) -> Result<ExactForward> {
    if model.reversible.first_scheme_layer() != 0 {
        bail!("exact mode needs `duplicate` seeding");
    }
    let dtype = model.residual_dtype;
    let ctx = model.ctx();
    let p0 = fp.encode(e)?;
    let mut s = States {
        other: p0.clone(),
        last: p0,
    };
    let mut bits = Vec::with_capacity(model.layers.len());
    let mut stored = Vec::new();
    // Each layer's largest |state|, read once after the stack: a read per layer would stall a
    // GPU stream.
    let mut peaks = Vec::with_capacity(model.layers.len());
    for (j, block) in model.layers.iter().enumerate() {
        if keep_states {
            stored.push(s.clone());
        }
        s = match model.reversible.two_step(j) {
            Some(step) => {
                let rule = ExactRule::for_step(&step)?;
                let f = block.f(&fp.view(&s.last, dtype)?, layout, &ctx)?;
                let (next, kept) = fp.two_step_forward(rule, step.c, &s.other, &s.last, &f)?;
                bits.push(kept);
                States {
                    other: s.last,
                    last: next,
                }
            }
            None => {
                let (q, p) = fp.hamiltonian_forward(
                    model.reversible.h,
                    &s.other,
                    &s.last,
                    |p| block.attention_branch(p, layout, &ctx),
                    |q| block.mlp_branch(q, &ctx),
                    dtype,
                )?;
                bits.push(None);
                States { other: q, last: p }
            }
        };
        peaks.push(
            s.other
                .abs()?
                .max_all()?
                .maximum(&s.last.abs()?.max_all()?)?,
        );
    }
    let peaks = Tensor::stack(&peaks, 0)?.to_vec1::<f64>()?;
    for (j, &peak) in peaks.iter().enumerate() {
        fp.check_peak(peak, &format!("layer {j}"))?;
    }
    Ok(ExactForward {
        top: s,
        bits,
        stored,
    })
}

/// Rebuilds every layer's input pair from the top of `fwd` with the fixed-point inverse
/// (index j holds the pair layer j consumed, like `fwd.stored`).
pub fn rebuild_all(
    model: &Model,
    fp: &FixedPoint,
    fwd: &ExactForward,
    layout: &mut Layout<'_>,
) -> Result<Vec<States>> {
    let dtype = model.residual_dtype;
    let ctx = model.ctx();
    let mut s = fwd.top.clone();
    let mut out = vec![s.clone(); model.layers.len()];
    for j in (0..model.layers.len()).rev() {
        let block = &model.layers[j];
        s = match model.reversible.two_step(j) {
            Some(step) => {
                let f = block.f(&fp.view(&s.other, dtype)?, layout, &ctx)?;
                let prev = fp.two_step_inverse(
                    ExactRule::for_step(&step)?,
                    step.c,
                    &s.other,
                    &s.last,
                    &f,
                    fwd.bits[j].as_ref(),
                )?;
                States {
                    other: prev,
                    last: s.other.clone(),
                }
            }
            None => {
                let h = model.reversible.h;
                let p = fp.hamiltonian_undo_mlp(
                    h,
                    &s.last,
                    &block.mlp_branch(&fp.view(&s.other, dtype)?, &ctx)?,
                )?;
                let q = fp.hamiltonian_undo_attn(
                    h,
                    &s.other,
                    &block.attention_branch(&fp.view(&p, dtype)?, layout, &ctx)?,
                )?;
                States { other: q, last: p }
            }
        };
        out[j] = s.clone();
    }
    Ok(out)
}

/// Why `model` cannot run in exact mode, or None when it can.
pub fn unsupported_reason(model: &Model) -> Option<String> {
    if !model.reversible.is_reversible() {
        return Some("euler is not reversible".into());
    }
    if model.reversible.first_scheme_layer() != 0 {
        return Some("exact mode needs `duplicate` seeding".into());
    }
    (0..model.layers.len())
        .filter_map(|j| model.reversible.two_step(j))
        .find_map(|step| ExactRule::for_step(&step).err().map(|e| e.to_string()))
}

/// Bits per element per layer that exact mode keeps for `model` (the mean over layers).
pub fn buffer_bits_per_element(model: &Model) -> Result<f64> {
    let mut total = 0u32;
    for j in 0..model.layers.len() {
        if let Some(step) = model.reversible.two_step(j) {
            total += ExactRule::for_step(&step)?.buffer_bits();
        }
    }
    Ok(total as f64 / model.layers.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ints(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn dropped_bits_rule_is_bit_exact() {
        let fp = FixedPoint::default();
        let rule = ExactRule::for_step(&TwoStep {
            a: -0.125,
            b: 1.125,
            c: 1.0,
        })
        .unwrap();
        assert_eq!(rule, ExactRule::DroppedBits { k: 3 });
        let prev = ints(&[12345.0, -12345.0, 7.0, -1.0, 0.0]);
        let cur = ints(&[-999.0, 31.0, 8.0, 5.0, -3.0]);
        let f = Tensor::new(&[0.1f32, -2.5, 3e-3, 0.0, 1.0], &Device::Cpu).unwrap();
        let (next, bits) = fp.two_step_forward(rule, 1.0, &prev, &cur, &f).unwrap();
        let back = fp
            .two_step_inverse(rule, 1.0, &cur, &next, &f, bits.as_ref())
            .unwrap();
        assert_eq!(
            back.to_vec1::<f64>().unwrap(),
            prev.to_vec1::<f64>().unwrap()
        );
        assert!(bits
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
            .iter()
            .all(|&b| b < 8));
    }

    #[test]
    fn overflow_is_refused() {
        let fp = FixedPoint { frac_bits: 50 };
        let err = fp
            .encode(&Tensor::new(&[100.0f32], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("fixed-point overflow"), "{err}");
    }

    /// An overflow inside the stack (the embedding fits) names its layer.
    #[test]
    fn layer_overflow_is_refused_with_its_layer() {
        use crate::model::loader::{build_model, random::RandomSource, WeightFormat};
        use crate::model::reversible::ReversibleConfig;
        let dev = Device::Cpu;
        let config = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 50, "max_position_embeddings": 16, "tie_word_embeddings": true
        }))
        .unwrap();
        // h = 100 multiplies every block's output into the overflow range.
        let model = build_model(
            &config,
            ReversibleConfig::parse("midpoint(h=100)").unwrap(),
            &RandomSource {
                seed: 1,
                separate_head: false,
            },
            WeightFormat::F32,
            &dev,
        )
        .unwrap();
        let e = model
            .embed(&Tensor::new(&[1u32, 2, 3], &dev).unwrap())
            .unwrap();
        let largest = e
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let fp = FixedPoint {
            frac_bits: (EXACT_LIMIT / largest).log2().floor() as u32 - 1,
        };
        let mut layout = Layout::Uniform { batch: 1, seq: 3 };
        let err = forward(&model, &fp, &e, &mut layout, false)
            .err()
            .expect("the stack overflows")
            .to_string();
        assert!(err.contains("fixed-point overflow at layer"), "{err}");
    }

    #[test]
    fn rules_need_unit_or_power_of_two_blend() {
        assert!(ExactRule::for_step(&TwoStep {
            a: -0.1,
            b: 1.1,
            c: 1.0
        })
        .is_err());
        assert_eq!(
            ExactRule::for_step(&TwoStep {
                a: 1.0,
                b: 0.0,
                c: 2.0
            })
            .unwrap()
            .buffer_bits(),
            0
        );
    }
}
