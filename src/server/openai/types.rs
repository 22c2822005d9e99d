//! OpenAI wire types (requests as clients send them, responses field for field).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Fields a request carried that no wire type names; each is either advisory or a 400.
pub type UnknownFields = BTreeMap<String, Value>;

/// `stop`: a string or a list of strings.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a final chunk with usage and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields common to both endpoints (OpenAI names plus the vLLM/llama.cpp extensions
/// `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// 0..=2; 0 is greedy. Default 1.
    pub temperature: Option<f32>,
    /// (0, 1]. Default 1.
    pub top_p: Option<f32>,
    /// Extension: keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension: [0, 1].
    pub min_p: Option<f32>,
    /// -2..=2.
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    pub frequency_penalty: Option<f32>,
    /// Extension: > 0, 1 = off.
    pub repetition_penalty: Option<f32>,
    /// Deterministic sampling seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<StopSpec>,
    /// Number of choices; only 1 is supported.
    pub n: Option<u32>,
    /// Extension: keep generating past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Token id (as a string) → bias in [-100, 100] added to its logit.
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

/// Message content: a string or a list of typed parts.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": "..."}, ...]`.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Part type (`text` is supported).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// An input chat message.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// system, developer, user, assistant.
    pub role: String,
    /// The content (may be null for assistant tool calls).
    pub content: Option<MessageContent>,
    /// The participant's name (advisory: templates do not use it).
    pub name: Option<String>,
    /// Any other field (`tool_calls`, `tool_call_id`, ...): refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// `POST /v1/chat/completions` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Legacy output cap.
    pub max_tokens: Option<u32>,
    /// Output cap (newer name; wins over `max_tokens`).
    pub max_completion_tokens: Option<u32>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Return logprobs of the output tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0..=20), requires `logprobs`.
    pub top_logprobs: Option<u8>,
    /// vLLM extension: name logprob tokens `token_id:N` instead of by their text.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    /// `{"type": "text"}` (structured output is not supported yet).
    pub response_format: Option<Value>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Everything else: advisory fields pass, others are refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// One token-id prompt.
    Tokens(Vec<u32>),
    /// Several text prompts (only one is supported).
    Texts(Vec<String>),
    /// Several token-id prompts (only one is supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Model name.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptInput,
    /// Output cap (default 16, as OpenAI).
    pub max_tokens: Option<u32>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Alternatives per token (0..=5); presence turns logprobs on.
    pub logprobs: Option<u8>,
    /// Echo the prompt (unsupported: 400 when true).
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion (unsupported).
    pub suffix: Option<String>,
    /// vLLM extension: add `prompt_token_ids` and `token_ids` to each choice.
    #[serde(default)]
    pub return_token_ids: bool,
    /// vLLM extension: name logprob tokens `token_id:N` instead of by their text.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    /// Candidates generated server-side per choice; only 1 (or equal to `n`) is supported.
    pub best_of: Option<u32>,
    /// `{"type": "text"}` (structured output is not supported yet).
    pub response_format: Option<Value>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Everything else: advisory fields pass, others are refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// `usage`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageOut {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
    /// Cache details.
    pub prompt_tokens_details: PromptTokensDetails,
}

impl From<crate::request::Usage> for UsageOut {
    fn from(u: crate::request::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// An assistant message in a response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The answer.
    pub message: ChatMessageOut,
    /// `{"content": [...]}` or null.
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion` object.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// Model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    pub usage: UsageOut,
    /// Backend identity.
    pub system_fingerprint: String,
}

/// `delta` of a chat chunk.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    /// Set on the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat chunk.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// New content.
    pub delta: ChatDelta,
    /// Logprobs of this chunk's tokens.
    pub logprobs: Option<Value>,
    /// Set on the last content chunk.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk` object.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// Model name.
    pub model: String,
    /// Zero (usage chunk) or one choice.
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    /// Backend identity.
    pub system_fingerprint: String,
}

/// One choice of a text completion (also used for its chunks).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: u32,
    /// Generated text.
    pub text: String,
    /// Legacy logprobs object or null.
    pub logprobs: Option<Value>,
    /// `stop`, `length`, or null mid-stream.
    pub finish_reason: Option<&'static str>,
    /// With `return_token_ids`: the prompt's ids (first chunk / response only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// With `return_token_ids`: ids generated in this choice (or chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `text_completion` object (response and stream chunks).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// Model name.
    pub model: String,
    /// Zero (usage chunk) or one choice.
    pub choices: Vec<CompletionChoice>,
    /// Present on responses and on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    /// Backend identity.
    pub system_fingerprint: String,
}
