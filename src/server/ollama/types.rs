//! Ollama wire types (requests; responses are built as JSON in the handlers).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// `options`: the Ollama runtime parameters mlxd honours. Absent values take Ollama's defaults
/// (`options.rs`); other keys land in `unknown`, where `options.rs` sorts them into hardware
/// hints (no effect here), "off" values, and refusals.
#[derive(Clone, Debug, Default, Deserialize)]
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
    pub unknown: BTreeMap<String, Value>,
}

/// Fields shared by `/api/generate` and `/api/chat`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonFields {
    /// Model name (`name` or `name:tag`).
    #[serde(default)]
    pub model: String,
    /// `"json"` or a JSON schema (structured output; not supported yet).
    pub format: Option<Value>,
    /// Runtime options.
    pub options: Option<Value>,
    /// Stream NDJSON (default true).
    pub stream: Option<bool>,
    /// How long to keep the model loaded (advisory: mlxd keeps its one model loaded).
    pub keep_alive: Option<Value>,
    /// Thinking mode (`false` or absent; `true` is refused until reasoning is split out).
    pub think: Option<Value>,
    /// Fields no wire type names (refused by name).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `POST /api/generate` body.
#[derive(Clone, Debug, Deserialize)]
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
    /// Base64 images (not supported).
    pub images: Option<Vec<String>>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    /// system, user, assistant or tool.
    pub role: String,
    /// Text.
    #[serde(default)]
    pub content: String,
    /// Base64 images (not supported).
    pub images: Option<Vec<String>>,
    /// Other fields (`tool_calls`, `thinking`, ...): refused by name.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `POST /api/chat` body.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The conversation (empty: just load the model).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Tool definitions (not supported yet).
    pub tools: Option<Vec<Value>>,
}

/// `POST /api/show` body (`model`, or the older `name`).
#[derive(Clone, Debug, Deserialize)]
pub struct ShowRequest {
    /// Model name.
    pub model: Option<String>,
    /// Older spelling of `model`.
    pub name: Option<String>,
}
