//! vLLM's `POST /tokenize` and `POST /detokenize`: the served model's tokenizer over HTTP.
//! llama.cpp's names for the same fields (`content`, `add_special`) are accepted too; any other
//! field is refused by name.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::chat::{remote_images, to_template_messages};
use super::reject_unknown;
use super::types::{ChatMessageIn, UnknownFields};
use crate::request::{tokenize_prompt, Prompt};
use crate::server::error::{ApiError, AppJson};
use crate::server::AppState;
use crate::text::ChatPrompt;

/// `/tokenize` body: a text `prompt`, or chat `messages` rendered with the template (their
/// images as the image tokens they become).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Text to tokenize (llama.cpp's `content`).
    #[serde(alias = "content")]
    pub prompt: Option<String>,
    /// Conversation to render and tokenize.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Add BOS and the like (text prompts; default true; llama.cpp's `add_special`).
    #[serde(alias = "add_special")]
    pub add_special_tokens: Option<bool>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// `/detokenize` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Ids to decode.
    pub tokens: Vec<u32>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// `/tokenize` response.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of ids.
    pub count: usize,
    /// Longest prompt + output accepted.
    pub max_model_len: usize,
    /// The ids.
    pub tokens: Vec<u32>,
    /// Always null (vLLM sends the token strings only when asked).
    pub token_strs: Option<Vec<String>>,
}

/// `/detokenize` response.
#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The decoded text (special tokens skipped).
    pub prompt: String,
}

/// Tokenizes a prompt or a templated conversation.
#[utoipa::path(post, path = "/tokenize", tag = "vllm", request_body = TokenizeRequest,
    responses((status = 200, description = "The ids", body = TokenizeResponse)))]
pub async fn tokenize(
    State(state): State<AppState>,
    AppJson(req): AppJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    reject_unknown(&req.unknown, "")?;
    let model = state.model(req.model.as_deref()).await?;
    let codec = &model.codec;
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => codec
            .encode(&prompt, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid("prompt", e.0))?,
        (None, Some(messages)) => {
            // Validation's own tokenization, so images count as the soft tokens they become
            // (decoding them is CPU work: off the async threads, as a request's validation).
            let remote = remote_images(&state, &messages).await?;
            let prompt = Prompt::Chat(ChatPrompt::new(to_template_messages(&messages, &remote)?));
            let (codec, limits) = (codec.clone(), model.limits.clone());
            tokio::task::spawn_blocking(move || tokenize_prompt(prompt, &codec, &limits))
                .await
                .map_err(|e| ApiError::invalid("messages", format!("could not be tokenized: {e}")))??
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.engine.info().max_model_len,
        tokens,
        token_strs: None,
    }))
}

/// Decodes ids back to text (special tokens skipped).
#[utoipa::path(post, path = "/detokenize", tag = "vllm", request_body = DetokenizeRequest,
    responses((status = 200, description = "The text", body = DetokenizeResponse)))]
pub async fn detokenize(
    State(state): State<AppState>,
    AppJson(req): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    reject_unknown(&req.unknown, "")?;
    let model = state.model(req.model.as_deref()).await?;
    let vocab = model.engine.info().model.vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is out of range (vocabulary size {vocab})"),
        ));
    }
    Ok(Json(DetokenizeResponse {
        prompt: model.codec.decode(&req.tokens),
    }))
}
