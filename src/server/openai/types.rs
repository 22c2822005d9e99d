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
    /// Deterministic sampling seed: a signed 64-bit integer, as vLLM takes it (any other number
    /// is a 400 naming `seed`).
    #[schema(value_type = Option<i64>)]
    pub seed: Option<serde_json::Number>,
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
    /// Part type: `text`, or `image_url` (models with vision input).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
    /// The image of an `image_url` part.
    pub image_url: Option<ImageUrl>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// An `image_url` part's image.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ImageUrl {
    /// A base64 `data:` URL (`data:image/png;base64,…`; PNG, JPEG, WebP or GIF), or an
    /// `http(s)` URL where the server was started with `--allow-image-urls`.
    pub url: String,
    /// `auto`, `low` or `high`. Accepted for compatibility: every image is seen at the one
    /// resolution the model's processor takes.
    pub detail: Option<String>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// An input chat message.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// system, developer, user, assistant, tool.
    pub role: String,
    /// The content (may be null for assistant tool calls).
    pub content: Option<MessageContent>,
    /// The participant's (or a tool result's function) name, passed to the template.
    pub name: Option<String>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// An assistant turn's earlier thought (vLLM's name).
    pub reasoning_content: Option<String>,
    /// The same, by its newer name.
    pub reasoning: Option<String>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// A call in an assistant message of the conversation.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ToolCallIn {
    /// The call's id.
    pub id: Option<String>,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionCallIn,
}

/// The function of a call: its name and arguments (a JSON string, as OpenAI sends them, or
/// an object).
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct FunctionCallIn {
    /// Function name.
    pub name: String,
    /// Arguments.
    #[schema(value_type = Object)]
    pub arguments: Value,
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
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {…}}`.
    pub response_format: Option<Value>,
    /// Functions the model may call: `[{"type": "function", "function": {name, description,
    /// parameters}}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `auto` (default with tools), `none`, `required`, or
    /// `{"type": "function", "function": {"name": …}}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// Allow several calls in one reply (default true); false ends the reply after one call.
    pub parallel_tool_calls: Option<bool>,
    /// Extra chat-template variables, e.g. `{"enable_thinking": false}`.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Passed to the chat template as `reasoning_effort` (templates that read it, e.g. gpt-oss).
    pub reasoning_effort: Option<String>,
    /// vLLM extension: false drops the model's thoughts from the reply.
    pub include_reasoning: Option<bool>,
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

impl PromptInput {
    /// Each prompt as the engine-neutral `Prompt` (texts tokenized with special tokens).
    pub fn into_prompts(self) -> Vec<crate::request::Prompt> {
        use crate::request::Prompt;
        let text = |text: String| Prompt::Text {
            text,
            add_special_tokens: true,
        };
        match self {
            Self::Text(t) => vec![text(t)],
            Self::Tokens(ids) => vec![Prompt::Tokens(ids)],
            Self::Texts(v) => v.into_iter().map(text).collect(),
            Self::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
        }
    }
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
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {…}}`.
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
    /// The answer text; null when the reply is only tool calls.
    pub content: Option<String>,
    /// The model's thought, when it thinks and thoughts are kept separate.
    #[serde(flatten)]
    pub thought: Thought,
    /// The calls the model made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// Thought text under both names clients read: `reasoning_content` (vLLM, DeepSeek) and
/// `reasoning` (newer clients); absent when there is none.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Thought {
    /// The thought.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

impl Thought {
    /// `text` under both names, or nothing when it is empty.
    pub fn of(text: String) -> Self {
        if text.is_empty() {
            return Self::default();
        }
        Self {
            reasoning_content: Some(text.clone()),
            reasoning: Some(text),
        }
    }
}

/// A call the model made.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ToolCallOut {
    /// `call_…`.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments (a JSON string).
    pub function: FunctionCallOut,
}

/// The function of a call.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FunctionCallOut {
    /// Function name.
    pub name: String,
    /// Arguments, a JSON object as a string.
    pub arguments: String,
}

/// A streamed piece of a call: the first piece of each call carries `id`, `type` and the
/// name, later ones argument text.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ToolCallDelta {
    /// Position of the call in the reply.
    pub index: u32,
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// On the first piece: `function`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name (first piece) and/or argument text.
    pub function: FunctionCallDelta,
}

/// The function part of a streamed call piece.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument text to append.
    pub arguments: String,
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
    /// `stop`, `length` or `tool_calls`.
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
    /// New thought text.
    #[serde(flatten)]
    pub thought: Thought,
    /// Call pieces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
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
