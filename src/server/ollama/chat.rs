//! `POST /api/chat`.

use axum::extract::State;
use axum::response::Response;

use serde_json::{json, Value};

use super::options::{chat_prompt, to_spec};
use super::reply::{Reply, ReplyKind};
use super::types::{ChatRequest, ChatResponse};
use super::{OllamaError, OllamaJson};
use crate::request::Prompt;
use crate::server::{fit, images, AppState};
use crate::text::{ChatImage, ChatMessage};

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
    let model = state
        .ollama_model(&req.common.model, req.common.keep_alive.as_ref())
        .await?;
    let messages = to_template_messages(&req)?;
    let mut chat = chat_prompt(messages, req.tools.clone().unwrap_or_default(), &req.common, &model)?;
    chat.reasoning = state.reasoning;
    let spec = to_spec(Prompt::Chat(chat), &req.common, &model)?;
    if req.messages.is_empty() {
        // Ollama's way to load (or, with keep_alive 0, unload) a model: nothing to generate.
        let reply = Reply::new(ReplyKind::Chat, &req.common.model, model);
        return Ok(reply.loaded(&state, req.common.keep_alive.as_ref()));
    }
    let reply = Reply::new(ReplyKind::Chat, &req.common.model, model.clone());
    let request = fit::validate_fitted(&state, &model, spec, req.common.truncate.unwrap_or(true)).await?;
    drop(model);
    reply
        .run_validated(&state, request, req.common.stream.unwrap_or(true))
        .await
}

/// The conversation as the template sees it. Ollama's calls carry no ids, so each gets one
/// (nine alphanumeric characters, which every template accepts) and each tool result answers
/// the earliest call not yet answered.
fn to_template_messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, OllamaError> {
    let mut unanswered = std::collections::VecDeque::new();
    let mut next_id = 0;
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
            if let Some(name) = m.unknown.keys().next() {
                return Err(OllamaError::bad_request(format!(
                    "unsupported field 'messages[{i}].{name}': this server does not implement it"
                )));
            }
            let mut message = ChatMessage::new(m.role.clone(), m.content.clone());
            message.images = images_before_text(m.images.as_deref(), &format!("messages[{i}].images"))?;
            message.reasoning_content = m.thinking.clone();
            message.name = m.tool_name.clone();
            if let Some(calls) = &m.tool_calls {
                let calls = calls.iter().map(|c| {
                    let id = format!("call{next_id:05}");
                    next_id += 1;
                    unanswered.push_back(id.clone());
                    let arguments = match &c.function.arguments {
                        Value::Null => json!({}),
                        args @ Value::Object(_) => args.clone(),
                        _ => {
                            return Err(OllamaError::bad_request(format!(
                                "messages[{i}].tool_calls: function.arguments must be an object"
                            )))
                        }
                    };
                    Ok(json!({"id": id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}}))
                });
                message.tool_calls = Some(calls.collect::<Result<_, _>>()?);
            }
            if m.role == "tool" {
                message.tool_call_id = unanswered.pop_front();
            }
            Ok(message)
        })
        .collect()
}

/// Ollama's `images` of a turn (bare base64), standing before its text as Ollama places them.
pub(super) fn images_before_text(images: Option<&[String]>, at: &str) -> Result<Vec<ChatImage>, OllamaError> {
    images
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, data)| {
            let bytes = images::from_base64(data).map_err(|e| OllamaError::bad_request(format!("{at}[{j}] {e}")))?;
            Ok(images::chat_image(bytes, 0))
        })
        .collect()
}
