//! API-neutral requests, below `engine/` and `scheduler/`: request ids, finish reasons and
//! usage, the `GenerationSpec` every API converts its wire request into, and the ONE
//! validation step (`validate`) that turns a spec into the `ValidatedRequest` the engine
//! accepts, and nothing else.
//!
//! Owner: built on a tokio worker (or `mlxd run`'s task) and moved into the engine by value.
//! Nothing here knows about HTTP or wire formats; each API maps `Field` to its own names.

mod embedding;
mod images;
mod keep_alive;
mod sampling;
mod spec;
mod validate;

use std::fmt;
use std::time::Duration;

pub use embedding::{validate_embedding, EmbeddingSpec, Pooling};
pub use images::{digest as image_digest, ImagePixels, ImageProcessor, ImageSpan, PromptImage, MAX_IMAGE_SIDE};
pub use keep_alive::KeepAlive;
pub use sampling::SamplingParams;
pub use spec::{Field, GenerationSpec, MaxTokens, Overflow, Prompt};
pub use validate::{tokenize_prompt, validate, RequestError, RequestLimits, RequestParts, ValidatedRequest};

/// Engine-wide unique id of one generation request (one sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS) was sampled, or the text stage matched a stop string.
    Stop,
    /// `max_tokens` or the model's context length was reached.
    Length,
    /// The reply ended with tool calls.
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }

    /// The Ollama wire name (`done_reason`), which has no name of its own for tool calls.
    pub fn ollama_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop | FinishReason::ToolCalls => "stop",
        }
    }
}

/// Token accounting and timing of one request, counted once by the engine.
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
