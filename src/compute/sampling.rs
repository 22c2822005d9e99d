//! What the device sampler (`fused::sample_rows`, the CUDA kernel `sample_rows`) takes and
//! answers: one row per sequence that samples, built by the engine's sampler from the request's
//! parameters and seeded RNG.

/// One row for the device sampler: the request's parameters, this step's uniform draw from
/// its seeded RNG, and the per-token adjustments its penalties and logit bias make.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSampleRow {
    /// ≤ 0: greedy.
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: u32,
    /// 1: no nucleus.
    pub top_p: f32,
    /// 0: no min-p.
    pub min_p: f32,
    /// In [0, 1): where in the kept mass the token falls.
    pub uniform: f32,
    /// Divides positive and multiplies negative logits of the tokens marked `repeat`.
    pub repetition_penalty: f32,
    /// Top logprobs wanted (None: no logprobs at all).
    pub logprobs: Option<u8>,
    /// At most one entry per token.
    pub adjust: Vec<TokenAdjust>,
    /// Tokens an output constraint allows (bit `t % 32` of word `t / 32`); None: all.
    pub allowed: Option<Vec<u32>>,
}

/// What penalties and bias do to one token's logit: the repetition penalty (when `repeat`),
/// then `+ add`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenAdjust {
    /// The token.
    pub token: u32,
    /// Apply the repetition penalty.
    pub repeat: bool,
    /// Presence and frequency penalties (negative) plus the logit bias.
    pub add: f32,
}

/// The device sampler's answer for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSample {
    /// The token.
    pub id: u32,
    /// Its log-probability under the raw logits, when logprobs were asked for.
    pub logprob: Option<f32>,
    /// The top logprobs `(id, logprob)`, best first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}
