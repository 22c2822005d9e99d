//! Wire types of OpenAI's Responses API (`/v1/responses`), as the `openai` SDKs and Codex CLI
//! send and read them. Items (input and output) stay JSON values: each kind is read and
//! written by name in `input.rs` and `output.rs`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::server::openai::types::UnknownFields;

/// `POST /v1/responses`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    /// Model name (absent or empty: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    /// The input: a user message's text, or items (`message` with `input_text`,
    /// `function_call`, `function_call_output`, `reasoning`).
    #[serde(default)]
    pub input: Option<Value>,
    /// A system message put before the input (not carried over to a continuation).
    #[serde(default)]
    pub instructions: Option<String>,
    /// Continue this stored response: its input and output come before this input.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Function tools (`name`, `description`, `parameters`), namespaces of them, and hosted
    /// `web_search` (accepted, not offered to the model: this server searches nothing).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `auto`, `none`, `required` or `{"type": "function", "name": …}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether the model may call several tools at once (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[serde(default)]
    pub text: Option<Value>,
    /// `{"effort": …, "summary": …}`: the template's reasoning switch, and whether the
    /// reasoning item carries a summary (the thought text).
    #[serde(default)]
    pub reasoning: Option<Value>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Sampling temperature (default 1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Alternatives reported per token when `include` asks for logprobs (0–20).
    #[serde(default)]
    pub top_logprobs: Option<u8>,
    /// Extra output: `message.output_text.logprobs`, `reasoning.encrypted_content`.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// Keep the response for `previous_response_id` and `GET` (default true).
    #[serde(default)]
    pub store: Option<bool>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_obfuscation": bool}`: accepted; this server pads no deltas.
    #[serde(default)]
    pub stream_options: Option<Value>,
    /// `disabled` (the default: a conversation too long for the context is a 400) or `auto`
    /// (its oldest turns are dropped until it fits, as Ollama fits a chat).
    #[serde(default)]
    pub truncation: Option<String>,
    /// The caller's tags, echoed in the response.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// The caller's end-user id, echoed.
    #[serde(default)]
    pub user: Option<String>,
    /// Any other field: refused by name, except the advisory ones.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// A response: what `POST /v1/responses` returns, `GET /v1/responses/{id}` finds again, and
/// stream events carry.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ResponseObject {
    /// `resp_…`.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix seconds.
    pub created_at: i64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: &'static str,
    /// Why it failed, when it did: `{"code", "message"}`.
    pub error: Option<Value>,
    /// Why it is incomplete: `{"reason": "max_output_tokens"}`.
    pub incomplete_details: Option<Value>,
    /// The request's instructions.
    pub instructions: Option<String>,
    /// The request's cap.
    pub max_output_tokens: Option<u32>,
    /// The model that answered.
    pub model: String,
    /// Items, in order: `reasoning`, `message` (with `output_text`), `function_call`.
    #[schema(value_type = Vec<Object>)]
    pub output: Vec<Value>,
    /// As requested.
    pub parallel_tool_calls: bool,
    /// The response this one continues.
    pub previous_response_id: Option<String>,
    /// `{"effort", "summary"}` as requested.
    #[schema(value_type = Object)]
    pub reasoning: Value,
    /// Whether it is stored.
    pub store: bool,
    /// As requested.
    pub temperature: f32,
    /// `{"format": …}` as requested.
    #[schema(value_type = Object)]
    pub text: Value,
    /// As requested: `auto`, `none`, `required` or `{"type": "function", "name": …}`.
    pub tool_choice: Value,
    /// As requested.
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    /// As requested.
    pub top_p: f32,
    /// As requested: `disabled` or `auto`.
    pub truncation: &'static str,
    /// Token accounting, once finished.
    pub usage: Option<ResponsesUsage>,
    /// As requested.
    pub user: Option<String>,
    /// As requested (`{}` when none).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Always false: every response is generated in the foreground.
    pub background: bool,
}

/// Token accounting of a response.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ResponsesUsage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Of which read from the prefix cache.
    pub input_tokens_details: CachedTokens,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Of which thought.
    pub output_tokens_details: ReasoningTokens,
    /// Input plus output.
    pub total_tokens: u32,
}

/// `input_tokens_details`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct CachedTokens {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: u32,
}

/// `output_tokens_details`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ReasoningTokens {
    /// Generated tokens that were thought (in the reasoning item).
    pub reasoning_tokens: u32,
}

/// What `DELETE /v1/responses/{id}` answers.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeletedResponse {
    /// The id.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Always true.
    pub deleted: bool,
}
