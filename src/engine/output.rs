//! What the engine sends back per request: a stream of token events ending in one terminal event.

use super::error::EngineError;
use crate::request::{FinishReason, Usage};

/// Log-probability of one alternative token at a step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Natural-log probability under the (temperature-free) model distribution.
    pub logprob: f32,
}

/// Log-probabilities reported with a sampled token when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first.
    pub top: Vec<TokenLogprob>,
    /// The raw logprobs of the request's `report_tokens`, in their order.
    pub reported: Vec<TokenLogprob>,
}

/// One event on a request's reply channel.
#[derive(Clone, Debug)]
pub enum TokenEvent {
    /// The sequence was scheduled for the first time; sent once, before any token.
    Scheduled {
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: u32,
    },
    /// A newly sampled token.
    Token {
        /// Token id.
        id: u32,
        /// Present when the request asked for logprobs.
        logprobs: Option<Logprobs>,
    },
    /// Logprobs of prompt tokens (for requests with `prompt_logprobs`): entry `i` describes
    /// the prompt token at position `first + i` given the tokens before it. Sent as the
    /// prompt is computed, before the first `Token`; a recomputed prompt (after preemption)
    /// sends its positions again, with the same values.
    PromptLogprobs {
        /// Position of the token the first entry describes (at least 1).
        first: usize,
        /// One entry per position.
        logprobs: Vec<Logprobs>,
    },
    /// An embedding request's vector (L2-normalised), sent just before `Finished`.
    Embedding(Vec<f32>),
    /// The sequence ended normally; no further events follow.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Final accounting.
        usage: Usage,
    },
    /// The sequence failed; no further events follow.
    Error(EngineError),
}
