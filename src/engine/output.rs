//! What the engine sends back per request: a stream of token events ending in one terminal event.

use std::time::Duration;

use super::error::EngineError;

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS) was sampled, or the server matched a stop string.
    Stop,
    /// `max_tokens` or the model's context length was reached.
    Length,
}

impl FinishReason {
    /// The wire name both OpenAI and Ollama use.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

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
}

/// Token accounting and timing of one finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Time from submission to the first scheduled step.
    pub queue_time: Duration,
    /// Time from the first scheduled step to the first sampled token.
    pub prefill_time: Duration,
    /// Time from the first sampled token to the last.
    pub decode_time: Duration,
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
