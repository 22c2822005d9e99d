//! Token selection from one row of logits: penalties, temperature, top-k, top-p, min-p, a
//! per-request seeded RNG, and logprobs.
//!
//! On the host over f32 logits (`sample`), or described for the device sampler
//! (`device_row`, CUDA: only ids and requested logprobs cross back); both apply the same
//! per-token adjustments and draw the same one uniform per step from the request's RNG. Each
//! row depends only on its own logits, parameters, RNG and tokens, so a seeded request samples
//! the same tokens whatever else is in the batch (the host and the device walk the kept tokens
//! in different orders, so the same seed picks differently on each).

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::output::{Logprobs, TokenLogprob};
use crate::compute::sampling::{DeviceSampleRow, TokenAdjust};
use crate::request::SamplingParams;

/// Scaled-logit distance below the best token beyond which a token's probability is
/// negligible (e^-30 ≈ 1e-13) and it is left out of sampling.
const NEGLIGIBLE_LOGIT_GAP: f32 = 30.0;

/// Per-request sampling state that lives as long as the request.
#[derive(Debug)]
pub struct SamplerState {
    params: SamplingParams,
    rng: StdRng,
}

/// What one row of the sampler produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    /// The chosen id.
    pub id: u32,
    /// Its log-probability and the top alternatives, when requested.
    pub logprobs: Option<Logprobs>,
}

impl SamplerState {
    /// State for `params`; without a seed the RNG is seeded from entropy.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when the token is the argmax of the raw logits: greedy, with no penalty, bias or
    /// logprobs. Such rows are decided on the device; only the id crosses to the host.
    pub fn is_plain_argmax(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0
            && p.logprobs.is_none()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logit_bias.is_empty()
            && p.report_tokens.is_empty()
    }

    /// This step of the request for the device sampler: parameters, the step's uniform draw
    /// (only when sampling at a temperature, as `sample` draws it) and the adjustments of the
    /// sequence so far (`tokens`, whose first `num_prompt` are the prompt), for a `vocab`-wide
    /// row.
    pub fn device_row(&mut self, tokens: &[u32], num_prompt: usize, vocab: usize) -> DeviceSampleRow {
        let uniform = if self.params.temperature > 0.0 {
            self.rng.random::<f32>()
        } else {
            0.0
        };
        let p = &self.params;
        DeviceSampleRow {
            temperature: p.temperature,
            top_k: p.top_k.unwrap_or(0),
            top_p: p.top_p,
            min_p: p.min_p,
            uniform,
            repetition_penalty: p.repetition_penalty,
            logprobs: p.logprobs,
            adjust: adjustments(p, tokens, num_prompt, vocab),
            allowed: None,
        }
    }

    /// Chooses the next token from `logits` (modified in place) given the sequence so far
    /// (`tokens`, whose first `num_prompt` are the prompt), among the tokens `allowed` (bit
    /// `t % 32` of word `t / 32`; None: all). Logprobs describe the raw logits.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        tokens: &[u32],
        num_prompt: usize,
        allowed: Option<&[u32]>,
    ) -> SampledToken {
        let wants = self.params.logprobs.is_some() || !self.params.report_tokens.is_empty();
        let logprobs = wants.then(|| (log_softmax(logits), self.params.logprobs.unwrap_or(0) as usize));
        apply_penalties(logits, &self.params, tokens, num_prompt);
        if let Some(words) = allowed {
            for (t, l) in logits.iter_mut().enumerate() {
                if words.get(t / 32).is_none_or(|w| w >> (t % 32) & 1 == 0) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let logprobs = logprobs.map(|(lp, n)| Logprobs {
            logprob: lp[id as usize],
            top: top_n(&lp, n),
            reported: self
                .params
                .report_tokens
                .iter()
                .map(|&id| TokenLogprob {
                    id,
                    logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
                })
                .collect(),
        });
        SampledToken { id, logprobs }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max_logit = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        // Only tokens within NEGLIGIBLE_LOGIT_GAP of the best can carry probability mass worth
        // sorting (e^-30 ≈ 1e-13 each): sorting them instead of the whole vocabulary keeps the
        // per-row cost small for 150K-token vocabularies.
        let floor = max_logit * inv_t - NEGLIGIBLE_LOGIT_GAP;
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .filter(|(_, l)| *l >= floor)
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k.filter(|&k| k > 0) {
            cands.truncate(k as usize);
        }
        // Softmax over the survivors (sorted, so the max is first).
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= threshold).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &pr) in probs[..keep].iter().enumerate() {
            if r < pr {
                return cands[i].0;
            }
            r -= pr;
        }
        cands[keep - 1].0
    }
}

/// Index of the largest logit (the first one on ties, as numpy/torch argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Repetition penalty over prompt and output (HF/llama.cpp: divide positive logits, multiply
/// negative ones), then OpenAI presence/frequency penalties over the output, then the logit
/// bias.
fn apply_penalties(logits: &mut [f32], p: &SamplingParams, tokens: &[u32], num_prompt: usize) {
    for a in adjustments(p, tokens, num_prompt, logits.len()) {
        let l = &mut logits[a.token as usize];
        if a.repeat {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        *l += a.add;
    }
}

/// What penalties and bias do to each affected token of a `vocab`-wide row, one entry per
/// token in id order: the one definition the host and device samplers share.
fn adjustments(p: &SamplingParams, tokens: &[u32], num_prompt: usize, vocab: usize) -> Vec<TokenAdjust> {
    let mut by_token: BTreeMap<u32, (bool, f32)> = BTreeMap::new();
    if p.repetition_penalty != 1.0 {
        let window = p.repeat_last_n.map_or(0, |n| tokens.len().saturating_sub(n));
        for &t in &tokens[window..] {
            by_token.entry(t).or_default().0 = true;
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in &tokens[num_prompt.min(tokens.len())..] {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            by_token.entry(t).or_default().1 -= p.frequency_penalty * c as f32 + p.presence_penalty;
        }
    }
    for &(t, bias) in &p.logit_bias {
        by_token.entry(t).or_default().1 += bias;
    }
    by_token
        .into_iter()
        .filter(|&(t, _)| (t as usize) < vocab)
        .map(|(token, (repeat, add))| TokenAdjust { token, repeat, add })
        .collect()
}

/// The logprob of `token` under raw `logits`, with the `n` likeliest alternatives (a prompt
/// token's report: no penalties, no temperature).
pub fn logprobs_of(logits: &[f32], token: u32, n: usize) -> Logprobs {
    let lp = log_softmax(logits);
    Logprobs {
        logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: top_n(&lp, n),
        reported: Vec::new(),
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|l| l - log_z).collect()
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx.into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: logprobs[id as usize],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(params: SamplingParams) -> SamplerState {
        SamplerState::new(params)
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = state(SamplingParams::greedy());
        let mut logits = [0.1, 0.7, 0.7, 0.2];
        assert_eq!(s.sample(&mut logits, &[], 0, None).id, 1);
    }

    #[test]
    fn top_k_one_is_greedy_even_with_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            seed: Some(3),
            ..SamplingParams::default()
        };
        let mut s = state(params);
        for _ in 0..20 {
            let mut logits = [0.1, 0.2, 0.9, 0.3];
            assert_eq!(s.sample(&mut logits, &[], 0, None).id, 2);
        }
    }

    #[test]
    fn same_seed_gives_the_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let draw = |params: &SamplingParams| {
            let mut s = state(params.clone());
            (0..32)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.05, 0.95], &[], 0, None).id)
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().any(|&t| t != a[0]), "a fair draw over 5 tokens varies: {a:?}");
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        // p ∝ e^[2, 0, -5]: top prob ≈ 0.88, token 2's ≈ 0.0008 < 0.1 · 0.88.
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.1,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let mut s = state(params);
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [2.0, 0.0, -5.0], &[], 0, None).id, 2);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probs ≈ [0.665, 0.245, 0.090]: top_p 0.6 keeps only token 0.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = state(params);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[], 0, None).id, 0);
        }
    }

    #[test]
    fn penalties_match_hand_computed_values() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut logits = [1.0, -1.0, 3.0, 0.5];
        // prompt [0], output [1, 1]
        apply_penalties(&mut logits, &p, &[0, 1, 1], 1);
        assert_eq!(logits, [0.5, -2.0 - 0.5 - 0.5, 3.0, 0.5]);
    }

    #[test]
    fn repetition_window_only_sees_recent_tokens() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            repeat_last_n: Some(1),
            ..SamplingParams::greedy()
        };
        let mut logits = [1.0, 1.0, 1.0];
        apply_penalties(&mut logits, &p, &[0, 1], 1);
        assert_eq!(logits, [1.0, 0.5, 1.0]);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let banned = SamplingParams {
            logit_bias: vec![(2, -100.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(state(banned).sample(&mut [0.1, 0.2, 9.0], &[], 0, None).id, 1);
        let forced = SamplingParams {
            temperature: 1.0,
            seed: Some(5),
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::default()
        };
        let mut s = state(forced);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 5.0], &[], 0, None).id, 0);
        }
    }

    #[test]
    fn logprobs_report_the_sampled_token_and_sorted_alternatives() {
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut s = state(p);
        let out = s.sample(&mut [0.0, 2.0, 1.0], &[], 0, None);
        let lp = out.logprobs.expect("requested");
        let z = (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp.logprob - (2.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn reported_tokens_get_their_raw_logprobs_whatever_is_sampled() {
        let p = SamplingParams {
            report_tokens: vec![0, 2],
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::greedy()
        };
        let mut s = state(p);
        assert!(!s.is_plain_argmax(), "reports are made on the host");
        let out = s.sample(&mut [0.0, 2.0, 1.0], &[], 0, None);
        assert_eq!(out.id, 0, "the bias decides the sample");
        let lp = out.logprobs.expect("reported");
        let z = (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        let reported: Vec<(u32, f32)> = lp.reported.iter().map(|t| (t.id, t.logprob)).collect();
        assert_eq!(reported.len(), 2);
        assert!((reported[0].1 - (0.0 - z)).abs() < 1e-6 && (reported[1].1 - (1.0 - z)).abs() < 1e-6);
        assert!(lp.top.is_empty(), "no alternatives were asked for");
    }
}
