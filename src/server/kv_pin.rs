//! `POST /v1/kv/pin` and `/v1/kv/unpin` (mlxd extension): park a conversation's KV on disk.
//! Pinning computes the prompt's KV if it is not cached yet (a one-token generation), and the
//! disk cache then keeps its full blocks whatever its size budget, across restarts, until they
//! are unpinned; a later request with the same prefix reads them back instead of computing.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, AppJson};
use super::openai::chat::{remote_images, to_template_messages};
use super::openai::types::{ChatMessageIn, PromptInput};
use super::AppState;
use crate::output::collect;
use crate::request::{GenerationSpec, MaxTokens, Prompt, SamplingParams};
use crate::text::ChatPrompt;

/// What to pin: a text or token prompt, or a conversation (rendered as a chat request would
/// render it, with the assistant prefix).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// Model name (default: the default model).
    pub model: Option<String>,
    /// A text or token-id prompt.
    pub prompt: Option<PromptInput>,
    /// A conversation.
    pub messages: Option<Vec<ChatMessageIn>>,
}

/// The answer: how much of the prompt is on disk, pinned (or no longer pinned).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PinResponse {
    /// The model.
    pub model: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Full KV blocks of the prompt on disk.
    pub blocks: usize,
    /// Tokens those blocks hold.
    pub tokens: usize,
}

/// Computes (if need be) and pins a prompt's KV blocks on disk.
#[utoipa::path(post, path = "/v1/kv/pin", tag = "mlxd", request_body = PinRequest,
    responses((status = 200, description = "The prompt's blocks on disk, pinned", body = PinResponse)))]
pub async fn pin(
    State(state): State<AppState>,
    AppJson(req): AppJson<PinRequest>,
) -> Result<Json<PinResponse>, ApiError> {
    run(state, req, true).await
}

/// Unpins a prompt's KV blocks (they age out of the disk cache again).
#[utoipa::path(post, path = "/v1/kv/unpin", tag = "mlxd", request_body = PinRequest,
    responses((status = 200, description = "The prompt's blocks on disk, no longer pinned", body = PinResponse)))]
pub async fn unpin(
    State(state): State<AppState>,
    AppJson(req): AppJson<PinRequest>,
) -> Result<Json<PinResponse>, ApiError> {
    run(state, req, false).await
}

async fn run(state: AppState, req: PinRequest, pin: bool) -> Result<Json<PinResponse>, ApiError> {
    let prompts = req.prompt.map(PromptInput::into_prompts);
    let prompt = match (prompts.as_deref(), &req.messages) {
        (Some([one]), None) => one.clone(),
        (None, Some(messages)) => {
            let remote = remote_images(&state, messages).await?;
            Prompt::Chat(ChatPrompt::new(to_template_messages(messages, &remote)?))
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` (a text or token ids) or `messages`",
            ))
        }
    };
    let model = state.model(req.model.as_deref()).await?;
    if !model.engine.info().kv_disk {
        return Err(ApiError::InvalidRequest {
            message: "pinning needs the prefix cache's disk tier, which this server was started without: \
                      start it with --kv-disk DIR (config: [engine] kv_disk)"
                .into(),
            param: None,
        });
    }
    let mut spec = GenerationSpec::new(prompt);
    spec.sampling = SamplingParams::greedy();
    spec.max_tokens = MaxTokens::Exactly(1);
    let request = state.validate(&model, spec).await?;
    let ids = request.prompt().to_vec();
    if pin {
        // The prefill computes the blocks and the engine writes them through before the pin.
        collect(state.generate(&model, request)?).await?;
    }
    let blocks = model
        .engine
        .pin(ids.clone(), pin)
        .await
        .map_err(|e| ApiError::invalid("model", e.to_string()))?;
    let block_size = model.engine.info().block_size;
    Ok(Json(PinResponse {
        model: model.name().to_string(),
        prompt_tokens: ids.len(),
        blocks,
        tokens: blocks * block_size,
    }))
}
