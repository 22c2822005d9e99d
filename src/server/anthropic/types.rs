//! Wire types of Anthropic's Messages API (`POST /v1/messages`), as the `anthropic` SDKs and
//! Claude Code send and read them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::server::openai::types::UnknownFields;

/// `POST /v1/messages` (and `/v1/messages/count_tokens`, which ignores the generation fields).
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct MessagesRequest {
    /// Model name (absent or empty: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation: alternating `user` and `assistant` turns.
    pub messages: Vec<MessagesTurn>,
    /// The system prompt: text, or text blocks.
    #[serde(default)]
    pub system: Option<MessagesContent>,
    /// Most tokens to generate (required by `/v1/messages`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Strings that end the reply.
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Sampling temperature (older clients; today's SDKs no longer send it).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass (older clients).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sample among the `top_k` likeliest tokens (older clients).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Client tools (`name`, `description`, `input_schema`).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// What the model may do with them.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Thinking: `{"type": "enabled", "budget_tokens": N}`, `adaptive`, `between_tools` or
    /// `disabled`, with `display` `summarized` or `omitted`.
    #[serde(default)]
    pub thinking: Option<Value>,
    /// `effort` (the template's reasoning effort) and `format` (`{"type": "json_schema",
    /// "schema": …}`: structured output through constrained decoding).
    #[serde(default)]
    pub output_config: Option<Value>,
    /// Context editing: `{"edits": [{"type": "clear_thinking_20251015", "keep": …}]}`.
    #[serde(default)]
    pub context_management: Option<Value>,
    /// The caller's tags (`user_id`); kept out of the model's prompt.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// One turn of the conversation.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct MessagesTurn {
    /// `user` or `assistant`.
    pub role: String,
    /// Text, or content blocks (`text`, `tool_use`, `tool_result`, `thinking`).
    pub content: MessagesContent,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// MessagesContent: a string, or a list of blocks (each a JSON object with a `type`).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessagesContent {
    /// Plain text.
    Text(String),
    /// MessagesContent blocks, read by `messages::read_block`.
    Blocks(Vec<Value>),
}

/// A reply, whole.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MessagesReply {
    /// `msg_…`.
    pub id: String,
    /// `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `assistant`.
    pub role: &'static str,
    /// The served model's name.
    pub model: String,
    /// `thinking`, `text` and `tool_use` blocks, in the order the model wrote them.
    pub content: Vec<Value>,
    /// `end_turn`, `max_tokens`, `stop_sequence` or `tool_use` (null while streaming).
    pub stop_reason: Option<&'static str>,
    /// The stop sequence that ended the reply.
    pub stop_sequence: Option<String>,
    /// Token accounting.
    pub usage: MessagesUsage,
}

/// Anthropic's usage: the prompt split into tokens read from the prefix cache and the rest.
#[derive(Clone, Copy, Debug, Default, Serialize, ToSchema)]
pub struct MessagesUsage {
    /// Prompt tokens computed for this request (not read from the cache).
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cache_read_input_tokens: u32,
    /// Always 0: the prefix cache fills itself, without a separate charge.
    pub cache_creation_input_tokens: u32,
}

/// `/v1/messages/count_tokens` answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TokenCount {
    /// Tokens of the rendered prompt (system, tools and messages).
    pub input_tokens: usize,
}

/// Anthropic's error shape (`{"type": "error", "error": {"type", "message"}}`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AnthropicErrorBody {
    /// `error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// What went wrong.
    pub error: AnthropicErrorDetail,
}

/// The inside of an Anthropic error.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AnthropicErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `request_too_large`, `rate_limit_error`, `api_error` or `overloaded_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Human-readable explanation.
    pub message: String,
}
