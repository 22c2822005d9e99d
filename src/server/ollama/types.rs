//! Ollama wire types (requests; responses are built as JSON in the handlers).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `options`: the Ollama runtime parameters mlxd honours. Absent values take Ollama's defaults
/// (`options.rs`); other keys land in `unknown`, where `options.rs` sorts them into hardware
/// hints (no effect here), "off" values, and refusals.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct Options {
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Minimum probability relative to the top token.
    pub min_p: Option<f32>,
    /// Tokens to generate: -1 until the context is full, -2 fill the context.
    pub num_predict: Option<i64>,
    /// Stop strings.
    pub stop: Option<Vec<String>>,
    /// Sampling seed (negative = random).
    pub seed: Option<i64>,
    /// Multiplicative repetition penalty.
    pub repeat_penalty: Option<f32>,
    /// Window of the repetition penalty: 0 off, -1 whole context.
    pub repeat_last_n: Option<i64>,
    /// Additive presence penalty.
    pub presence_penalty: Option<f32>,
    /// Additive frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Context window for this request (capped by the model's).
    pub num_ctx: Option<i64>,
    /// Every other option.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, Value>,
}

/// Fields shared by `/api/generate` and `/api/chat`.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct CommonFields {
    /// Model name (`name` or `name:tag`).
    #[serde(default)]
    pub model: String,
    /// `"json"` or a JSON schema: the output is constrained to it.
    pub format: Option<Value>,
    /// Runtime options.
    pub options: Option<Value>,
    /// Stream NDJSON (default true).
    pub stream: Option<bool>,
    /// How long to keep the model loaded (advisory: mlxd keeps its one model loaded).
    pub keep_alive: Option<Value>,
    /// Thinking: `true` / `false` (the template's `enable_thinking`), or `"high"`, `"medium"`,
    /// `"low"` (thinking on, passed as `reasoning_effort`). The thought comes back in
    /// `thinking`.
    #[schema(value_type = Option<Object>)]
    pub think: Option<Value>,
    /// When the prompt does not fit the context (default true): a chat drops its oldest turns
    /// (keeping the system messages, the tools and the latest user turn) until it does, and
    /// tokens are cut out of the prompt's middle when even that is too long, as Ollama's
    /// runner cuts them; false answers 400 instead.
    pub truncate: Option<bool>,
    /// Ollama's context shift while generating; only `false` is accepted: a reply ends at the
    /// context's end (`done_reason: "length"`).
    pub shift: Option<bool>,
    /// Fields no wire type names (refused by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, Value>,
}

/// `POST /api/generate` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct GenerateRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The prompt (empty: just load the model).
    #[serde(default)]
    pub prompt: String,
    /// Text after the insertion point (fill-in-the-middle).
    pub suffix: Option<String>,
    /// System prompt, replacing the template's default.
    pub system: Option<String>,
    /// Go template override (not supported).
    pub template: Option<String>,
    /// Skip the chat template.
    #[serde(default)]
    pub raw: bool,
    /// Token ids returned by a previous response; the new prompt continues them.
    pub context: Option<Vec<u32>>,
    /// Base64 images (PNG, JPEG, WebP, GIF) for a model with vision input; they stand before
    /// the text.
    pub images: Option<Vec<String>>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct Message {
    /// system, user, assistant or tool.
    pub role: String,
    /// Text.
    #[serde(default)]
    pub content: String,
    /// Base64 images (PNG, JPEG, WebP, GIF) for a model with vision input; they stand before
    /// the text.
    pub images: Option<Vec<String>>,
    /// An assistant turn's earlier thought.
    pub thinking: Option<String>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool result's function name.
    pub tool_name: Option<String>,
    /// Other fields: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, Value>,
}

/// A tool call, in a conversation or a reply.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct ToolCall {
    /// The function called.
    pub function: FunctionCall,
}

/// The function of a call, with its arguments as an object.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct FunctionCall {
    /// Position of the call in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Function name.
    pub name: String,
    /// Arguments.
    #[schema(value_type = Object)]
    pub arguments: Value,
}

/// `POST /api/chat` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The conversation (empty: just load the model).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Functions the model may call (OpenAI's tool objects).
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
}

/// `POST /api/show` body (`model`, or the older `name`).
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ShowRequest {
    /// Model name.
    pub model: Option<String>,
    /// Older spelling of `model`.
    pub name: Option<String>,
}

/// Counts and durations (nanoseconds) of the last object of a reply; absent before it.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct FinalStats {
    /// Whole request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_duration: Option<u64>,
    /// Template and tokenization (the model is resident).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_duration: Option<u64>,
    /// Prompt tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_eval_count: Option<u32>,
    /// Queue and prefill time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_eval_duration: Option<u64>,
    /// Generated tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_count: Option<u32>,
    /// Decode time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_duration: Option<u64>,
}

/// One NDJSON line, or the whole reply, of `/api/generate`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    /// Model name as requested.
    pub model: String,
    /// RFC 3339 time.
    pub created_at: String,
    /// New text.
    pub response: String,
    /// New thought text (thinking models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    /// True on the last object.
    pub done: bool,
    /// `stop`, `length` or `load` (last object only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    /// Prompt and generated ids, to continue from (last object only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<u32>>,
    /// Counts and durations (last object only).
    #[serde(flatten)]
    pub stats: FinalStats,
}

/// The assistant message of a chat reply.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MessageOut {
    /// Always `assistant`.
    pub role: &'static str,
    /// New text.
    pub content: String,
    /// New thought text (thinking models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    /// Calls the model made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One NDJSON line, or the whole reply, of `/api/chat`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatResponse {
    /// Model name as requested.
    pub model: String,
    /// RFC 3339 time.
    pub created_at: String,
    /// New text of the assistant's message.
    pub message: MessageOut,
    /// True on the last object.
    pub done: bool,
    /// `stop`, `length` or `load` (last object only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    /// Counts and durations (last object only).
    #[serde(flatten)]
    pub stats: FinalStats,
}

/// What a model is, as Ollama lists it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OllamaModelDetails {
    /// Always empty.
    pub parent_model: String,
    /// Weight container.
    pub format: String,
    /// Ollama's architecture name.
    pub family: String,
    /// `[family]`.
    pub families: Vec<String>,
    /// Parameter count, human readable.
    pub parameter_size: String,
    /// Weight dtype or quantization.
    pub quantization_level: String,
}

/// One model of `/api/tags` or `/api/ps`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OllamaModelEntry {
    /// `name:tag`.
    pub name: String,
    /// Same as `name`.
    pub model: String,
    /// Weights' modification time (RFC 3339; tags only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_at: Option<String>,
    /// Bytes of weights (tags) or of weights and KV memory (ps).
    pub size: u64,
    /// Digest of the weights.
    pub digest: String,
    /// What the model is.
    pub details: OllamaModelDetails,
    /// Bytes in accelerator memory (ps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_vram: Option<u64>,
    /// When the model would be unloaded (ps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Context length (ps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
}

/// `/api/tags` and `/api/ps` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OllamaModelList {
    /// The served model.
    pub models: Vec<OllamaModelEntry>,
}

/// `/api/show` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ShowResponse {
    /// A Modelfile describing the model.
    pub modelfile: String,
    /// `PARAMETER` lines without the keyword.
    pub parameters: String,
    /// The chat template (Jinja, as the model ships it).
    pub template: String,
    /// What the model is.
    pub details: OllamaModelDetails,
    /// GGUF-style architecture facts (`general.architecture`, `<arch>.context_length`, ...).
    pub model_info: serde_json::Map<String, Value>,
    /// What the model can do.
    pub capabilities: Vec<String>,
    /// Weights' modification time.
    pub modified_at: String,
    /// The model's own system prompt (an Ollama manifest's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// `/api/version` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct VersionResponse {
    /// The Ollama API version followed.
    pub version: String,
    /// mlxd's own version.
    pub mlxd_version: String,
}
