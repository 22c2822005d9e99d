//! `POST /api/chat`.

use axum::extract::State;
use axum::response::Response;

use super::options::to_spec;
use super::reply::{Reply, ReplyKind};
use super::types::{ChatRequest, ChatResponse};
use super::{OllamaError, OllamaJson};
use crate::request::Prompt;
use crate::server::AppState;
use crate::text::ChatMessage;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Generates the assistant's next message for a conversation.
#[utoipa::path(post, path = "/api/chat", tag = "ollama", request_body = ChatRequest,
    responses((status = 200,
        description = "The reply; streamed (the default) as NDJSON objects, the last with `done: true`",
        content((ChatResponse = "application/json"), (ChatResponse = "application/x-ndjson")))))]
#[tracing::instrument(skip_all)]
pub async fn chat(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<ChatRequest>,
) -> Result<Response, OllamaError> {
    state.check_ollama_model(&req.common.model)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad_request(format!(
            "{} does not support tools",
            req.common.model
        )));
    }
    let messages = to_template_messages(&req)?;
    let spec = to_spec(Prompt::Chat(messages), &req.common)?;
    let reply = Reply::new(ReplyKind::Chat, &req.common.model, &state);
    if req.messages.is_empty() {
        // Ollama's way to load a model: nothing to generate.
        return Ok(reply.loaded());
    }
    reply.run(&state, spec, req.common.stream.unwrap_or(true)).await
}

fn to_template_messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, OllamaError> {
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(OllamaError::bad_request(format!(
                    "invalid role '{}' (expected one of {})",
                    m.role,
                    ROLES.join(", ")
                )));
            }
            if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
                return Err(OllamaError::bad_request(
                    "images are not supported: this model has no vision input",
                ));
            }
            if let Some(name) = m.unknown.keys().next() {
                return Err(OllamaError::bad_request(format!(
                    "unsupported field 'messages[{i}].{name}': this server does not implement it"
                )));
            }
            Ok(ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
        })
        .collect()
}
