//! `POST /api/generate`.

use axum::extract::State;
use axum::response::Response;

use super::types::GenerateRequest;
use super::{reject_unsupported, sampling_from_options, OllamaError, OllamaJson, Reply, ReplyKind};
use crate::server::AppState;
use crate::text::ChatMessage;

/// Completes a prompt (templated as one user turn unless `raw`), optionally continuing the
/// token `context` of an earlier response.
#[tracing::instrument(skip_all)]
pub async fn generate(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<GenerateRequest>,
) -> Result<Response, OllamaError> {
    state.check_ollama_model(&req.common.model)?;
    reject_unsupported(req.common.format.as_ref(), req.images.as_deref())?;
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
    let sampling = sampling_from_options(req.common.options.as_ref())?;
    let reply = Reply::new(ReplyKind::Generate, &req.common.model, &state);
    if req.prompt.is_empty() && req.context.is_none() {
        return Ok(reply.loaded());
    }
    let prompt = build_prompt(&state, &req)?;
    reply
        .run(&state, prompt, sampling, req.common.stream.unwrap_or(true))
        .await
}

/// Token ids of the request: `context` followed by the (templated or raw) new prompt.
fn build_prompt(state: &AppState, req: &GenerateRequest) -> Result<Vec<u32>, OllamaError> {
    let codec = &state.codec;
    let bad = |e: crate::text::TemplateError| OllamaError::bad_request(e.0);
    let templated = !req.raw && codec.chat_template_source().is_some();
    let mut ids = if templated {
        let mut messages = Vec::new();
        if let Some(system) = req.system.as_ref().filter(|s| !s.is_empty()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: req.prompt.clone(),
        });
        codec.encode_chat(&messages).map_err(bad)?
    } else {
        codec.encode(&req.prompt, req.context.is_none()).map_err(bad)?
    };
    if let Some(context) = &req.context {
        // A continuation must not restart the sequence with another BOS.
        if codec.bos_id().is_some() && ids.first().copied() == codec.bos_id() {
            ids.remove(0);
        }
        let vocab = state.engine.info().model.vocab_size;
        if let Some(bad_id) = context.iter().find(|&&id| id as usize >= vocab) {
            return Err(OllamaError::bad_request(format!(
                "context holds token id {bad_id}, outside the vocabulary"
            )));
        }
        ids.splice(0..0, context.iter().copied());
    }
    Ok(ids)
}
