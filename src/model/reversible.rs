//! The coupling rules between blocks: forward Euler (the original network) and the
//! time-reversible integrators, each forward step beside its inverse.
//!
//! The two-step schemes share one form, p_{j+1} = A p_{j-1} + B p_j + C f_j(p_j):
//!
//! | scheme      | A  | B     | C   |
//! |-------------|----|-------|-----|
//! | euler       | 0  | 1     | 1   |
//! | midpoint    | 1  | 0     | 2h  |
//! | midpoint(a) | a  | 1 - a | h   |
//! | leapfrog    | -1 | 2     | h^2 |
//!
//! so their inverse is p_{j-1} = (p_{j+1} - B p_j - C f_j(p_j)) / A (A != 0). Hamiltonian
//! carries (q, p) and splits the block: q_j = q_{j-1} + h Attn_j(N1 p_{j-1});
//! p_j = p_{j-1} + h MLP_j(N2 q_j); it is undone MLP step first, then attention.
//! Linear stability in both directions needs |A| = 1 (arXiv 2512.02056, and `docs`).

use anyhow::{bail, Context};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemeKind {
    Euler,
    Midpoint,
    MidpointA,
    Leapfrog,
    Hamiltonian,
}

/// The blend a of midpoint(a): one value for every layer, or one per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Blend {
    Constant(f64),
    PerLayer(Vec<f64>),
}

/// How the extra state of a two-state scheme is seeded from the embedding e.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Seeding {
    /// p_{-1} = p_0 = e (hamiltonian: q_0 = p_0 = e); every block is a scheme step.
    #[default]
    Duplicate,
    /// p_0 = e, p_1 = p_0 + f_0(p_0): block 0 is an Euler step, the scheme starts at block 1.
    EulerStep,
}

/// Which state feeds the final norm and LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// p_L (hamiltonian: p).
    #[default]
    Last,
    /// p_{L-1} (hamiltonian: q).
    Other,
    /// The mean of the two carried states.
    Mean,
}

/// Everything that defines how blocks are coupled; stored with every saved model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReversibleConfig {
    pub scheme: SchemeKind,
    /// Step size h.
    #[serde(default = "one")]
    pub h: f64,
    /// Blend a of midpoint(a); ignored by the other schemes.
    #[serde(default = "minus_one")]
    pub a: Blend,
    #[serde(default)]
    pub seeding: Seeding,
    #[serde(default)]
    pub readout: Readout,
}

fn one() -> f64 {
    1.0
}
fn minus_one() -> Blend {
    Blend::Constant(-1.0)
}

/// Coefficients of p_{j+1} = a p_{j-1} + b p_j + c f_j(p_j).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoStep {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl Default for ReversibleConfig {
    fn default() -> Self {
        Self::euler()
    }
}

impl ReversibleConfig {
    /// The original, non-reversible network.
    pub fn euler() -> Self {
        Self {
            scheme: SchemeKind::Euler,
            h: 1.0,
            a: minus_one(),
            seeding: Seeding::Duplicate,
            readout: Readout::Last,
        }
    }

    /// Parses `euler`, `midpoint`, `midpoint(a=-0.125)` / `midpoint(-0.125)`, `leapfrog`,
    /// `hamiltonian`, each optionally followed by `,h=0.5` inside the parentheses.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let spec = spec.trim();
        let (name, args) = match spec.find('(') {
            Some(i) if spec.ends_with(')') => (&spec[..i], &spec[i + 1..spec.len() - 1]),
            Some(_) => bail!("scheme `{spec}`: unbalanced parentheses"),
            None => (spec, ""),
        };
        let mut config = Self::euler();
        config.scheme = match name.trim() {
            "euler" => SchemeKind::Euler,
            "midpoint" => SchemeKind::Midpoint,
            "midpoint_a" | "midpoint-a" => SchemeKind::MidpointA,
            "leapfrog" => SchemeKind::Leapfrog,
            "hamiltonian" => SchemeKind::Hamiltonian,
            other => bail!("unknown scheme `{other}`: use euler, midpoint, midpoint(a), leapfrog or hamiltonian"),
        };
        for arg in args.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let (key, value) = arg.split_once('=').unwrap_or(("a", arg));
            let value: f64 = value
                .trim()
                .parse()
                .with_context(|| format!("scheme `{spec}`: `{arg}` is not a number"))?;
            match key.trim() {
                "a" => {
                    if name.trim() == "midpoint" {
                        config.scheme = SchemeKind::MidpointA;
                    }
                    config.a = Blend::Constant(value);
                }
                "h" => config.h = value,
                other => bail!("scheme `{spec}`: unknown setting `{other}` (use a or h)"),
            }
        }
        Ok(config)
    }

    /// A short human-readable name, e.g. `midpoint(a=-0.125,h=1)`.
    pub fn label(&self) -> String {
        match (&self.scheme, &self.a) {
            (SchemeKind::MidpointA, Blend::Constant(a)) => format!("midpoint(a={a},h={})", self.h),
            (SchemeKind::MidpointA, Blend::PerLayer(_)) => {
                format!("midpoint(a=per-layer,h={})", self.h)
            }
            (SchemeKind::Euler, _) => "euler".into(),
            (kind, _) => format!(
                "{}(h={})",
                serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                self.h
            ),
        }
    }

    pub fn validate(&self, num_layers: usize) -> anyhow::Result<()> {
        if !self.h.is_finite() || self.h == 0.0 {
            bail!("step size h must be finite and non-zero, got {}", self.h);
        }
        if let Blend::PerLayer(a) = &self.a {
            if self.scheme == SchemeKind::MidpointA && a.len() != num_layers {
                bail!(
                    "per-layer blend has {} values for {} layers",
                    a.len(),
                    num_layers
                );
            }
        }
        if self.scheme == SchemeKind::MidpointA {
            for j in 0..num_layers {
                if self.blend(j) == 0.0 {
                    bail!("midpoint(a) with a = 0 at layer {j} is not invertible");
                }
            }
        }
        Ok(())
    }

    /// Whether every state can be rebuilt from the top two.
    pub fn is_reversible(&self) -> bool {
        self.scheme != SchemeKind::Euler
    }

    pub fn blend(&self, layer: usize) -> f64 {
        match &self.a {
            Blend::Constant(a) => *a,
            Blend::PerLayer(a) => a.get(layer).copied().unwrap_or(-1.0),
        }
    }

    /// The first block that runs as a scheme step (block 0 is an Euler seed under `EulerStep`).
    pub fn first_scheme_layer(&self) -> usize {
        match (self.scheme, self.seeding) {
            (SchemeKind::Euler | SchemeKind::Hamiltonian, _) => 0,
            (_, Seeding::Duplicate) => 0,
            (_, Seeding::EulerStep) => 1,
        }
    }

    /// Coefficients of layer `layer` for the two-step schemes; None for hamiltonian.
    pub fn two_step(&self, layer: usize) -> Option<TwoStep> {
        let h = self.h;
        Some(match self.scheme {
            SchemeKind::Euler => TwoStep {
                a: 0.0,
                b: 1.0,
                c: 1.0,
            },
            SchemeKind::Midpoint => TwoStep {
                a: 1.0,
                b: 0.0,
                c: 2.0 * h,
            },
            SchemeKind::MidpointA => {
                let a = self.blend(layer);
                TwoStep {
                    a,
                    b: 1.0 - a,
                    c: h,
                }
            }
            SchemeKind::Leapfrog => TwoStep {
                a: -1.0,
                b: 2.0,
                c: h * h,
            },
            SchemeKind::Hamiltonian => return None,
        })
    }
}

/// Scales `x` by `s`, skipping the multiply when s is 1 (keeps additions exact, and shares
/// `x` instead of copying it).
pub fn scaled(x: &Tensor, s: f64) -> Result<Tensor> {
    if s == 1.0 {
        Ok(x.clone())
    } else {
        x.affine(s, 0.0)
    }
}

impl TwoStep {
    /// p_{j+1} = a p_{j-1} + b p_j + c f.
    pub fn forward(&self, prev: &Tensor, cur: &Tensor, f: &Tensor) -> Result<Tensor> {
        let mut next = scaled(f, self.c)?;
        if self.b != 0.0 {
            next = (next + scaled(cur, self.b)?)?;
        }
        if self.a != 0.0 {
            next = (next + scaled(prev, self.a)?)?;
        }
        Ok(next)
    }

    /// p_{j-1} = (p_{j+1} - b p_j - c f) / a.
    pub fn inverse(&self, cur: &Tensor, next: &Tensor, f: &Tensor) -> Result<Tensor> {
        if self.a == 0.0 {
            candle_core::bail!("this step (a = 0) has no inverse");
        }
        let mut rest = (next - scaled(f, self.c)?)?;
        if self.b != 0.0 {
            rest = (rest - scaled(cur, self.b)?)?;
        }
        scaled(&rest, 1.0 / self.a)
    }
}

/// One hamiltonian layer: (q_{j-1}, p_{j-1}) -> (q_j, p_j).
pub fn hamiltonian_forward(
    h: f64,
    q: &Tensor,
    p: &Tensor,
    attn: impl FnOnce(&Tensor) -> Result<Tensor>,
    mlp: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let q_next = (q + scaled(&attn(p)?, h)?)?;
    let p_next = (p + scaled(&mlp(&q_next)?, h)?)?;
    Ok((q_next, p_next))
}

/// Undoes one hamiltonian layer: (q_j, p_j) -> (q_{j-1}, p_{j-1}).
pub fn hamiltonian_inverse(
    h: f64,
    q: &Tensor,
    p: &Tensor,
    attn: impl FnOnce(&Tensor) -> Result<Tensor>,
    mlp: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let p_prev = (p - scaled(&mlp(q)?, h)?)?;
    let q_prev = (q - scaled(&attn(&p_prev)?, h)?)?;
    Ok((q_prev, p_prev))
}

/// Combines the two carried states into the read-out state.
pub fn read_out(readout: Readout, other: &Tensor, last: &Tensor) -> Result<Tensor> {
    match readout {
        Readout::Last => Ok(last.clone()),
        Readout::Other => Ok(other.clone()),
        Readout::Mean => (other + last)? * 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scheme_specs() {
        let m = ReversibleConfig::parse("midpoint(a=-0.125)").unwrap();
        assert_eq!(m.scheme, SchemeKind::MidpointA);
        assert_eq!(m.blend(3), -0.125);
        let m = ReversibleConfig::parse("leapfrog(h=0.5)").unwrap();
        assert_eq!((m.scheme, m.h), (SchemeKind::Leapfrog, 0.5));
        assert!(ReversibleConfig::parse("rk4").is_err());
        assert!(ReversibleConfig::parse("midpoint(h=x)").is_err());
        assert_eq!(
            ReversibleConfig::parse("midpoint").unwrap().two_step(0),
            Some(TwoStep {
                a: 1.0,
                b: 0.0,
                c: 2.0
            })
        );
    }

    #[test]
    fn two_step_inverse_undoes_forward() {
        let dev = candle_core::Device::Cpu;
        let prev = Tensor::new(&[1.5f64, -2.0], &dev).unwrap();
        let cur = Tensor::new(&[0.25f64, 4.0], &dev).unwrap();
        let f = Tensor::new(&[3.0f64, -1.0], &dev).unwrap();
        for spec in ["midpoint", "midpoint(a=-0.125)", "leapfrog(h=0.5)"] {
            let step = ReversibleConfig::parse(spec).unwrap().two_step(0).unwrap();
            let next = step.forward(&prev, &cur, &f).unwrap();
            let back = step.inverse(&cur, &next, &f).unwrap();
            assert_eq!(
                back.to_vec1::<f64>().unwrap(),
                prev.to_vec1::<f64>().unwrap(),
                "{spec}"
            );
        }
    }
}
