//! `POST /api/generate`.

use axum::extract::State;
use axum::response::Response;

use super::chat::images_before_text;
use super::options::{chat_prompt, to_spec};
use super::reply::{Reply, ReplyKind};
use super::types::{GenerateRequest, GenerateResponse};
use super::{OllamaError, OllamaJson};
use crate::request::Prompt;
use crate::server::registry::ModelLease;
use crate::server::{fit, AppState};
use crate::text::ChatMessage;

/// Completes a prompt (templated as one user turn unless `raw`), optionally continuing the
/// token `context` of an earlier response.
#[utoipa::path(post, path = "/api/generate", tag = "ollama", request_body = GenerateRequest,
    responses((status = 200,
        description = "The reply; streamed (the default) as NDJSON objects, the last with `done: true`",
        content((GenerateResponse = "application/json"), (GenerateResponse = "application/x-ndjson")))))]
#[tracing::instrument(skip_all)]
pub async fn generate(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<GenerateRequest>,
) -> Result<Response, OllamaError> {
    let model = state
        .ollama_model(&req.common.model, req.common.keep_alive.as_ref())
        .await?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(OllamaError::bad_request(format!(
            "{} does not support insert (it has no fill-in-the-middle template)",
            req.common.model
        )));
    }
    if req.template.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(OllamaError::bad_request(
            "template overrides are not supported; the model's own chat template is used",
        ));
    }
    let context = req.context.clone().unwrap_or_default();
    let mut spec = to_spec(prompt_of(&state, &model, &req)?, &req.common, &model)?;
    let reply = Reply::new(ReplyKind::Generate, &req.common.model, model.clone());
    if req.prompt.is_empty() && context.is_empty() {
        // Ollama's way to load (or, with keep_alive 0, unload) a model: nothing to generate.
        return Ok(reply.loaded(&state, req.common.keep_alive.as_ref()));
    }
    spec.context = context;
    let request = fit::validate_fitted(&state, &model, spec, req.common.truncate.unwrap_or(true)).await?;
    drop(model);
    reply
        .run_validated(&state, request, req.common.stream.unwrap_or(true))
        .await
}

/// The new input: one templated user turn (after an optional system turn), read for thoughts
/// like a chat reply; or the raw text.
fn prompt_of(state: &AppState, model: &ModelLease, req: &GenerateRequest) -> Result<Prompt, OllamaError> {
    let templated = !req.raw && model.codec.chat_template_source().is_some();
    if !templated {
        if req.common.think.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(OllamaError::bad_request(
                "think needs the chat template; it cannot be combined with raw",
            ));
        }
        if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(OllamaError::bad_request(
                "images need the chat template (they stand in a user turn); they cannot be combined with raw",
            ));
        }
        return Ok(Prompt::Text {
            text: req.prompt.clone(),
            add_special_tokens: true,
        });
    }
    let mut messages = Vec::new();
    if let Some(system) = req.system.as_ref().filter(|s| !s.is_empty()) {
        messages.push(ChatMessage::new("system", system.clone()));
    }
    let mut user = ChatMessage::new("user", req.prompt.clone());
    user.images = images_before_text(req.images.as_deref(), "images")?;
    messages.push(user);
    let mut chat = chat_prompt(messages, Vec::new(), &req.common, model)?;
    chat.reasoning = state.reasoning;
    Ok(Prompt::Chat(chat))
}
