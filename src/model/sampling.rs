//! Next-token selection from one row of logits, on the CPU.
//!
//! This runs once per decode step for every sequence, so it never sorts the vocabulary: the
//! vocabulary-wide passes (max, exp, sums) are written so the compiler vectorizes them, top-k is
//! a partial selection, top-p a mass-weighted quickselect, and plain temperature sampling one
//! linear draw.
//!
//! Order of operations (as in Hugging Face `generate` and vLLM):
//! 1. repetition penalty, presence/frequency penalties, logit bias, the optional `allowed` mask;
//! 2. logprobs are reported from the log-softmax of these processed logits, i.e. before
//!    temperature and truncation: that is the model's distribution as the request shaped it,
//!    which is what OpenAI's `logprobs` describe, and it does not change with `temperature`;
//! 3. temperature, then top-k, top-p (relative to the top-k mass) and min-p, then one draw.

use crate::kernels::vector_math::{exp, max_of, sum_f64};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Below this temperature sampling is greedy: dividing by it would overflow to infinities.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Below this many candidates, top-n selection keeps a small sorted buffer in one pass instead
/// of partitioning an index array of the whole vocabulary.
const SMALL_TOP_N: usize = 64;

/// The top-p quickselect sorts its remaining range once it is this small.
const NUCLEUS_SORT: usize = 64;

/// How the next token is chosen. `Default` matches OpenAI's defaults: temperature 1, top-p 1,
/// no penalties, no bias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 (or anything below [`GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens until their mass reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the most likely token's.
    pub min_p: f32,
    /// HF/vLLM repetition penalty over the distinct tokens seen (prompt set with
    /// [`Sampler::set_prompt`] plus the completion): positive logits are divided by it,
    /// negative ones multiplied. 1 disables it.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from every token that occurs in the completion.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per occurrence in the completion.
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Makes sampling reproducible; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Checks the ranges; the API layer can call it to reject a request before it is queued.
    /// Token ids in `logit_bias` are checked against the vocabulary when sampling.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            bail!("top_p must be in [0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            bail!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            );
        }
        if !self.presence_penalty.is_finite() {
            bail!(
                "presence_penalty must be finite, got {}",
                self.presence_penalty
            );
        }
        if !self.frequency_penalty.is_finite() {
            bail!(
                "frequency_penalty must be finite, got {}",
                self.frequency_penalty
            );
        }
        if let Some(&(id, bias)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            bail!("logit_bias for token {id} must be finite, got {bias}");
        }
        Ok(())
    }
}

/// The chosen token with its logprob and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Log-probability of `id` under the processed (pre-temperature) distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens with their logprobs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Samples tokens for one sequence; owns its random generator so seeded requests reproduce.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Distinct prompt tokens (sorted), for the repetition penalty only.
    prompt: Vec<u32>,
    // Scratch buffers reused across steps so the hot path does not allocate.
    logits: Vec<f32>,
    weights: Vec<f32>,
    order: Vec<u32>,
    seen: Vec<u32>,
}

impl Sampler {
    /// Parameters are validated on every [`Sampler::sample`] call, so a bad request surfaces as
    /// an error from the first step rather than a panic here.
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
            prompt: Vec::new(),
            logits: Vec::new(),
            weights: Vec::new(),
            order: Vec::new(),
            seen: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Makes the repetition penalty also cover the prompt, as HF and vLLM do. Presence and
    /// frequency penalties keep counting the completion only (OpenAI's definition).
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        self.prompt = prompt.to_vec();
        self.prompt.sort_unstable();
        self.prompt.dedup();
    }

    /// Picks the next token. `previous` is the completion generated so far (for the penalties);
    /// `top_logprobs` alternatives are reported (0 for none).
    pub fn sample(
        &mut self,
        logits: &[f32],
        previous: &[u32],
        top_logprobs: usize,
    ) -> Result<SampledToken> {
        self.sample_masked(logits, previous, top_logprobs, None)
    }

    /// Like [`Sampler::sample`], choosing only among tokens whose `allowed` entry is true (for
    /// constrained decoding). Disallowed tokens get probability 0, also in the logprobs.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        previous: &[u32],
        top_logprobs: usize,
        allowed: Option<&[bool]>,
    ) -> Result<SampledToken> {
        self.params.validate()?;
        let n = logits.len();
        if n == 0 {
            bail!("cannot sample from an empty logits row");
        }
        if n > u32::MAX as usize {
            bail!("vocabulary of {n} entries does not fit token ids");
        }
        if let Some(mask) = allowed {
            if mask.len() != n {
                bail!(
                    "allowed-token mask has {} entries for {n} logits",
                    mask.len()
                );
            }
        }
        self.process(logits, previous, allowed)?;

        let max = max_of(&self.logits);
        if max == f32::NEG_INFINITY {
            bail!("no token can be sampled: every candidate is masked out");
        }
        // weights = exp(l - max): the softmax numerators at temperature 1, reused by the draw
        // when the temperature is 1.
        exp_shifted(&self.logits, max, 1.0, &mut self.weights);
        let log_z = max + sum_f64(&self.weights).ln() as f32;

        let id = if self.params.is_greedy() {
            first_index_of(&self.logits, max)
        } else {
            self.draw(max)
        };
        let logprob = self.logits[id as usize] - log_z;
        let top = if top_logprobs > 0 {
            top_n(&self.logits, top_logprobs.min(n), &mut self.order);
            self.order
                .iter()
                .map(|&i| (i, self.logits[i as usize] - log_z))
                // Masked tokens have no probability; listing them as -inf would break JSON.
                .filter(|(_, lp)| lp.is_finite())
                .collect()
        } else {
            Vec::new()
        };
        Ok(SampledToken { id, logprob, top })
    }

    /// Copies `logits` into the scratch row and applies penalties, bias and mask.
    fn process(
        &mut self,
        logits: &[f32],
        previous: &[u32],
        allowed: Option<&[bool]>,
    ) -> Result<()> {
        let n = logits.len();
        // `!(l < inf)` catches NaN and +inf; folding without short-circuit lets it vectorize.
        if logits
            .iter()
            .fold(false, |bad, &l| bad | l.is_nan() | (l == f32::INFINITY))
        {
            bail!("the model produced NaN or +inf logits");
        }
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        let p = &self.params;
        let row = &mut self.logits;

        // Count completion tokens by sorting a copy: O(m log m) for m generated tokens, far
        // cheaper than anything vocabulary-sized.
        let counting = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let repeating = p.repetition_penalty != 1.0;
        if counting || repeating {
            self.seen.clear();
            self.seen.extend_from_slice(previous);
            self.seen.sort_unstable();
        }
        if repeating {
            // Each distinct token once, whether seen in the prompt, the completion or both.
            let mut apply = |id: u32| {
                if let Some(l) = row.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            };
            let (mut a, mut b) = (self.prompt.iter().peekable(), self.seen.iter().peekable());
            let mut last = None;
            loop {
                let next = match (a.peek(), b.peek()) {
                    (Some(&&x), Some(&&y)) if x <= y => a.next().copied(),
                    (Some(_), Some(_)) => b.next().copied(),
                    (Some(_), None) => a.next().copied(),
                    (None, Some(_)) => b.next().copied(),
                    (None, None) => break,
                };
                if next != last {
                    if let Some(id) = next {
                        apply(id);
                    }
                    last = next;
                }
            }
        }
        if counting {
            for run in self.seen.chunk_by(|a, b| a == b) {
                // Ids beyond the row cannot be penalised: they have no logit.
                if let Some(l) = row.get_mut(run[0] as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
        for &(id, bias) in &p.logit_bias {
            match row.get_mut(id as usize) {
                Some(l) => *l += bias,
                None => bail!("logit_bias names token {id}, outside the vocabulary of {n}"),
            }
        }
        if let Some(mask) = allowed {
            for (l, &ok) in row.iter_mut().zip(mask) {
                if !ok {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Temperature, truncation and one random draw over the processed logits. `max` is their
    /// (finite) maximum and `self.weights` holds exp(l - max).
    fn draw(&mut self, max: f32) -> u32 {
        let p = &self.params;
        let n = self.logits.len();
        let logits = &self.logits;
        let weights = &mut self.weights;
        if p.temperature != 1.0 {
            exp_shifted(logits, max, 1.0 / p.temperature, weights);
        }
        // p_i / p_max >= min_p  <=>  (l_i - max) / T >= ln(min_p): a cut in logit space. The
        // kept set of every truncation is a prefix of the tokens by decreasing logit, so min-p
        // is a plain filter whatever comes before it.
        let min_logit = if p.min_p > 0.0 {
            max + p.temperature * p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let top_k = if p.top_k > 0 && p.top_k < n {
            p.top_k
        } else {
            n
        };

        if top_k == n && p.top_p >= 1.0 {
            // No ordering needed: one linear draw.
            if p.min_p > 0.0 {
                for (w, &l) in weights.iter_mut().zip(logits) {
                    if l < min_logit {
                        *w = 0.0;
                    }
                }
            }
            let target = self.rng.random::<f64>() * sum_f64(weights);
            return pick(
                weights.iter().enumerate().map(|(i, &w)| (i as u32, w)),
                target,
            );
        }

        let weights = &*weights;
        let order = &mut self.order;
        if top_k < n {
            top_n(logits, top_k, order);
        } else {
            // Only top-p: tokens lighter than (1 - top_p) * Z / n can never be in the nucleus
            // (all of them together weigh less than the (1 - top_p) * Z it leaves out), which
            // removes most of the vocabulary before any ordering.
            let floor = ((1.0 - p.top_p as f64) * sum_f64(weights) / n as f64) as f32;
            order.clear();
            order.extend((0..n as u32).filter(|&i| weights[i as usize] >= floor));
        }
        let mut kept: &mut [u32] = order;
        if p.top_p < 1.0 {
            // Top-p is relative to the mass top-k left (HF order: top-k, then top-p); without
            // top-k, to the whole vocabulary's (the prefilter removed less than its complement).
            let mass: f64 = if top_k < n {
                kept.iter().map(|&i| weights[i as usize] as f64).sum()
            } else {
                sum_f64(weights)
            };
            let len = nucleus(kept, logits, weights, p.top_p as f64 * mass);
            kept = &mut kept[..len];
        }
        let candidates = || {
            kept.iter()
                .filter(|&&i| logits[i as usize] >= min_logit)
                .map(|&i| (i, weights[i as usize]))
        };
        let total: f64 = candidates().map(|(_, w)| w as f64).sum();
        let target = self.rng.random::<f64>() * total;
        pick(candidates(), target)
    }
}

/// Moves the smallest set of most likely tokens whose weight reaches `target` to the front of
/// `idx` and returns its size (at least 1). A quickselect that halves the range by the median
/// and keeps the half where the cumulative mass crosses `target`: O(n) on average, where
/// growing a sorted window would sort thousands of tokens on flat distributions.
fn nucleus(idx: &mut [u32], logits: &[f32], weights: &[f32], target: f64) -> usize {
    let (mut lo, mut hi, mut need) = (0, idx.len(), target);
    while hi - lo > NUCLEUS_SORT {
        let mid = (hi - lo) / 2;
        idx[lo..hi].select_nth_unstable_by(mid, |&a, &b| before(logits, a, b));
        let upper: f64 = idx[lo..=lo + mid]
            .iter()
            .map(|&i| weights[i as usize] as f64)
            .sum();
        if upper >= need {
            hi = lo + mid + 1;
        } else {
            need -= upper;
            lo += mid + 1;
        }
    }
    idx[lo..hi].sort_unstable_by(|&a, &b| before(logits, a, b));
    let mut mass = 0.0;
    for j in lo..hi {
        mass += weights[idx[j] as usize] as f64;
        if mass >= need {
            return j + 1;
        }
    }
    hi.max(1)
}

/// Token order for truncation: higher logit first, lower id first among ties (deterministic).
/// `total_cmp` orders -inf (masked) last.
fn before(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// `out[i] = exp((values[i] - shift) * scale)`, vectorised (libm's `expf`, which this replaced,
/// dominated the sampling time).
fn exp_shifted(values: &[f32], shift: f32, scale: f32, out: &mut Vec<f32>) {
    out.resize(values.len(), 0.0);
    for (o, &v) in out.iter_mut().zip(values) {
        *o = exp((v - shift) * scale);
    }
}

/// Index of the first entry equal to `value` (0 if none): ties go to the lowest id. Blocks are
/// tested with a branch-free fold (vectorized) before the one holding it is searched.
fn first_index_of(values: &[f32], value: f32) -> u32 {
    const BLOCK: usize = 64;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &v| hit | (v == value)) {
            let at = block.iter().position(|&v| v == value).unwrap_or(0);
            return (b * BLOCK + at) as u32;
        }
    }
    0
}

/// The first candidate at which the running weight exceeds `target`; the last positive one if
/// rounding leaves the sum just short.
fn pick(candidates: impl Iterator<Item = (u32, f32)>, target: f64) -> u32 {
    let mut acc = 0.0;
    let mut last = 0;
    for (id, w) in candidates {
        if w <= 0.0 {
            continue;
        }
        acc += w as f64;
        last = id;
        if acc > target {
            return id;
        }
    }
    last
}

/// Writes into `order` the indices of the `m` largest values, largest first, lower index first
/// among ties.
fn top_n(values: &[f32], m: usize, order: &mut Vec<u32>) {
    let m = m.min(values.len());
    order.clear();
    if m == 0 {
        return;
    }
    let before = |a: u32, b: u32| before(values, a, b);
    if m <= SMALL_TOP_N {
        // One pass with a short sorted buffer: after the first few hundred entries almost every
        // value fails the plain comparison with the current last, so this is ~n comparisons.
        // Blocks with nothing at or above the current m-th value are skipped by a branch-free
        // (vectorized) test.
        const BLOCK: usize = 64;
        let mut floor = f32::NEG_INFINITY;
        for (b, block) in values.chunks(BLOCK).enumerate() {
            if order.len() == m && !block.iter().fold(false, |any, &v| any | (v >= floor)) {
                continue;
            }
            for (j, &v) in block.iter().enumerate() {
                let i = (b * BLOCK + j) as u32;
                if order.len() == m {
                    if v < floor || before(i, order[m - 1]).is_ge() {
                        continue;
                    }
                    order.pop();
                }
                let at = order.partition_point(|&o| before(o, i).is_lt());
                order.insert(at, i);
                if order.len() == m {
                    floor = values[order[m - 1] as usize];
                }
            }
        }
        return;
    }
    order.extend(0..values.len() as u32);
    if m < values.len() {
        order.select_nth_unstable_by(m - 1, |&a, &b| before(a, b));
        order.truncate(m);
    }
    order.sort_unstable_by(|&a, &b| before(a, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    /// Empirical frequencies of `draws` samples.
    fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, &[], 0).unwrap().id as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "token {i}: frequency {g} vs expected {w} (all: {got:?})"
            );
        }
    }

    /// Logits whose softmax is [0.1, 0.2, 0.3, 0.4].
    fn four() -> Vec<f32> {
        [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn defaults_match_openai() {
        let p = SamplingParams::default();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.min_p),
            (1.0, 1.0, 0, 0.0)
        );
        assert_eq!(
            (
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty
            ),
            (1.0, 0.0, 0.0)
        );
        assert!(p.logit_bias.is_empty() && p.seed.is_none());
    }

    #[test]
    fn greedy_takes_argmax_and_lowest_id_on_ties() {
        let mut s = Sampler::new(&SamplingParams::greedy());
        assert_eq!(s.sample(&[0.5, 3.0, -1.0, 2.0], &[], 0).unwrap().id, 1);
        assert_eq!(s.sample(&[1.0, 4.0, 4.0, 4.0], &[], 0).unwrap().id, 1);
        // Tiny temperatures are greedy too, not a division overflow.
        let mut s = Sampler::new(&params(|p| p.temperature = 1e-7));
        assert_eq!(s.sample(&[0.0, 0.1, 0.0], &[], 0).unwrap().id, 1);
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let mut s = Sampler::new(&SamplingParams::greedy());
        let t = s.sample(&[1.0, 2.0, 3.0], &[], 2).unwrap();
        // ln(e + e^2 + e^3) = 3.4076059644
        assert_eq!(t.id, 2);
        assert!((t.logprob - -0.407_606).abs() < 1e-5, "{}", t.logprob);
        assert_eq!(t.top.len(), 2);
        assert_eq!((t.top[0].0, t.top[1].0), (2, 1));
        assert!((t.top[0].1 - -0.407_606).abs() < 1e-5);
        assert!((t.top[1].1 - -1.407_606).abs() < 1e-5);
    }

    #[test]
    fn logprobs_ignore_temperature() {
        let mut s = Sampler::new(&params(|p| p.temperature = 0.3));
        let t = s.sample(&four(), &[], 4).unwrap();
        let want = [0.1f32, 0.2, 0.3, 0.4][t.id as usize].ln();
        assert!((t.logprob - want).abs() < 1e-5, "{} vs {want}", t.logprob);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, [3, 2, 1, 0]);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut s = Sampler::new(&p);
        // Penalised logits: [0, -(0.5 + 2*0.25), -(0.5 + 0.25), 0] = [0, -1, -0.75, 0].
        let t = s.sample(&[0.0, 0.0, 0.0, 0.0], &[1, 2, 1], 4).unwrap();
        assert_eq!(t.id, 0);
        // ln(2 + e^-1 + e^-0.75) = 1.0438907
        let lse = 1.043_890_7f32;
        let want = [(0, -lse), (3, -lse), (2, -0.75 - lse), (1, -1.0 - lse)];
        for ((id, lp), (wid, wlp)) in t.top.iter().zip(want) {
            assert_eq!(*id, wid);
            assert!((lp - wlp).abs() < 1e-5, "{id}: {lp} vs {wlp}");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(&params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        }));
        // [2, -2, 1.5] with tokens 0 and 1 seen -> [1, -4, 1.5]: token 2 now wins.
        let t = s.sample(&[2.0, -2.0, 1.5], &[0, 1, 0], 3).unwrap();
        assert_eq!(t.id, 2);
        // ln(e^1 + e^-4 + e^1.5) = 1.9766176; the penalty applies once despite token 0 twice.
        let lse = 1.976_617_6f32;
        assert!((t.top[1].1 - (1.0 - lse)).abs() < 1e-5, "{:?}", t.top);
        assert!((t.top[2].1 - (-4.0 - lse)).abs() < 1e-5, "{:?}", t.top);

        // With the prompt registered, a token seen only there is penalised too, still once.
        s.set_prompt(&[2, 2, 0]);
        let t = s.sample(&[2.0, -2.0, 1.5], &[0], 0).unwrap();
        // [1, -2, 0.75]
        assert_eq!(t.id, 0);
        let lse = (1f32.exp() + (-2f32).exp() + 0.75f32.exp()).ln();
        assert!((t.logprob - (1.0 - lse)).abs() < 1e-5);
    }

    #[test]
    fn logit_bias_and_its_range_check() {
        let mut s = Sampler::new(&params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(0, 100.0)];
        }));
        assert_eq!(s.sample(&[1.0, 5.0], &[], 0).unwrap().id, 0);
        let mut s = Sampler::new(&params(|p| p.logit_bias = vec![(9, 1.0)]));
        let err = s.sample(&[1.0, 5.0], &[], 0).unwrap_err().to_string();
        assert!(err.contains("token 9"), "{err}");
    }

    #[test]
    fn mask_restricts_the_choice() {
        let mut s = Sampler::new(&params(|p| p.temperature = 0.0));
        let allowed = [true, false, true, false];
        let t = s
            .sample_masked(&[1.0, 9.0, 2.0, 8.0], &[], 4, Some(&allowed))
            .unwrap();
        assert_eq!(t.id, 2);
        // Only allowed tokens are listed; their logprobs renormalise over the allowed set.
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), [2, 0]);
        let lse = (1f32.exp() + 2f32.exp()).ln();
        assert!((t.logprob - (2.0 - lse)).abs() < 1e-5);

        let mut s = Sampler::new(&params(|_| {}));
        for _ in 0..200 {
            let id = s.sample_masked(&four(), &[], 0, Some(&allowed)).unwrap().id;
            assert!(id == 0 || id == 2);
        }
        assert!(s.sample_masked(&four(), &[], 0, Some(&[false; 4])).is_err());
        assert!(s.sample_masked(&four(), &[], 0, Some(&[true; 3])).is_err());
    }

    #[test]
    fn plain_sampling_follows_softmax() {
        let mut s = Sampler::new(&params(|_| {}));
        assert_close(
            &frequencies(&mut s, &four(), 40_000),
            &[0.1, 0.2, 0.3, 0.4],
            0.01,
        );
    }

    #[test]
    fn temperature_sharpens() {
        // T = 0.5 squares the probabilities: [1, 4, 9, 16] / 30.
        let mut s = Sampler::new(&params(|p| p.temperature = 0.5));
        let want = [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0];
        assert_close(&frequencies(&mut s, &four(), 40_000), &want, 0.01);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let mut s = Sampler::new(&params(|p| p.top_k = 2));
        assert_close(
            &frequencies(&mut s, &four(), 40_000),
            &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
            0.01,
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Sorted: 0.4, 0.3 (0.7 < 0.75), 0.2 (0.9 >= 0.75): three tokens survive.
        let mut s = Sampler::new(&params(|p| p.top_p = 0.75));
        assert_close(
            &frequencies(&mut s, &four(), 40_000),
            &[0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0],
            0.01,
        );
        // top_p = 0 keeps only the most likely token.
        let mut s = Sampler::new(&params(|p| p.top_p = 0.0));
        assert_close(
            &frequencies(&mut s, &four(), 1_000),
            &[0.0, 0.0, 0.0, 1.0],
            0.0,
        );
    }

    #[test]
    fn top_p_is_relative_to_the_top_k_mass() {
        // Top-2 renormalised: [3/7, 4/7]; 4/7 = 0.571 >= 0.5 so only token 3 is left.
        let mut s = Sampler::new(&params(|p| {
            p.top_k = 2;
            p.top_p = 0.5;
        }));
        assert_close(
            &frequencies(&mut s, &four(), 1_000),
            &[0.0, 0.0, 0.0, 1.0],
            0.0,
        );
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Threshold 0.55 * 0.4 = 0.22: keeps 0.4 and 0.3.
        let mut s = Sampler::new(&params(|p| p.min_p = 0.55));
        assert_close(
            &frequencies(&mut s, &four(), 40_000),
            &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
            0.01,
        );
    }

    #[test]
    fn top_p_on_a_flat_distribution() {
        // 3000 equal tokens: the nucleus of 0.5 is exactly the first 1500 by id (ties go to
        // lower ids), found by several quickselect rounds.
        let logits = vec![0.0f32; 3000];
        let mut s = Sampler::new(&params(|p| p.top_p = 0.5));
        let mut highest = 0;
        for _ in 0..4000 {
            let id = s.sample(&logits, &[], 0).unwrap().id;
            assert!(id < 1500, "{id} is outside the nucleus");
            highest = highest.max(id);
        }
        assert!(highest > 1400, "{highest}: the nucleus was cut short");
    }

    #[test]
    fn large_top_k_uses_partial_selection() {
        // 1000 tokens where only ids >= 900 are likely; top_k = 100 (past the small-buffer path)
        // must keep exactly those.
        let logits: Vec<f32> = (0..1000)
            .map(|i| if i >= 900 { 5.0 } else { 0.0 })
            .collect();
        let mut s = Sampler::new(&params(|p| p.top_k = 100));
        for _ in 0..2000 {
            assert!(s.sample(&logits, &[], 0).unwrap().id >= 900);
        }
    }

    #[test]
    fn seeds_reproduce() {
        let draw = |seed| {
            let mut s = Sampler::new(&params(|p| p.seed = Some(seed)));
            (0..50)
                .map(|_| s.sample(&four(), &[], 0).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut s = Sampler::new(&params(|_| {}));
        assert!(s.sample(&[], &[], 0).is_err());
        assert!(s.sample(&[0.0, f32::NAN], &[], 0).is_err());
        for bad in [
            params(|p| p.temperature = -1.0),
            params(|p| p.top_p = 1.5),
            params(|p| p.min_p = -0.1),
            params(|p| p.repetition_penalty = 0.0),
            params(|p| p.frequency_penalty = f32::INFINITY),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            assert!(Sampler::new(&bad).sample(&four(), &[], 0).is_err());
        }
    }

    #[test]
    fn top_n_orders_and_breaks_ties_by_id() {
        let values = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0];
        let mut order = Vec::new();
        top_n(&values, 3, &mut order);
        assert_eq!(order, [1, 2, 4]);
        // The large path agrees with the small one.
        let big: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32).collect();
        let mut small = Vec::new();
        top_n(&big, SMALL_TOP_N, &mut small);
        let mut large = Vec::new();
        top_n(&big, SMALL_TOP_N + 1, &mut large);
        assert_eq!(&large[..SMALL_TOP_N], &small[..]);
    }
}
