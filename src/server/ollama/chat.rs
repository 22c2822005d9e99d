//! `POST /api/chat`.

use axum::extract::State;
use axum::response::Response;

use super::types::ChatRequest;
use super::{reject_unsupported, sampling_from_options, OllamaError, OllamaJson, Reply, ReplyKind};
use crate::server::AppState;
use crate::text::ChatMessage;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Generates the assistant's next message for a conversation.
#[tracing::instrument(skip_all)]
pub async fn chat(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<ChatRequest>,
) -> Result<Response, OllamaError> {
    state.check_ollama_model(&req.common.model)?;
    reject_unsupported(req.common.format.as_ref(), None)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad_request(format!(
            "{} does not support tools",
            req.common.model
        )));
    }
    let sampling = sampling_from_options(req.common.options.as_ref())?;
    let reply = Reply::new(ReplyKind::Chat, &req.common.model, &state);
    if req.messages.is_empty() {
        return Ok(reply.loaded());
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(OllamaError::bad_request(format!(
                "invalid role '{}' (expected one of {})",
                m.role,
                ROLES.join(", ")
            )));
        }
        reject_unsupported(None, m.images.as_deref())?;
        messages.push(ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        });
    }
    let codec = state.codec.clone();
    let prompt = tokio::task::spawn_blocking(move || codec.encode_chat(&messages))
        .await
        .map_err(|e| OllamaError::bad_request(e.to_string()))?
        .map_err(|e| OllamaError::bad_request(e.0))?;
    reply
        .run(&state, prompt, sampling, req.common.stream.unwrap_or(true))
        .await
}
