//! `POST /v1/chat/completions`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatMessageIn,
    ChatMessageOut, MessageContent, UsageOut,
};
use super::{json_event, new_id, resolve_max_tokens, sampling_params, sse_response, unix_now};
use crate::engine::{FinishReason, GenerateRequest};
use crate::server::error::{ApiError, AppJson};
use crate::server::stream::{collect, GeneratedToken, StreamItem, TextStream};
use crate::server::AppState;
use crate::text::{ChatMessage, TextCodec};

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Generates the assistant's reply to a conversation, as one JSON object or an SSE stream.
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    state.check_model(req.model.as_deref())?;
    let messages = to_template_messages(&req.messages)?;
    if req.top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs must be between 0 and 20",
        ));
    }
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let (params, stops) = sampling_params(&req.sampling, logprobs)?;
    let codec = state.codec.clone();
    let prompt = {
        let codec = codec.clone();
        tokio::task::spawn_blocking(move || codec.encode_chat(&messages))
            .await
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?
            .map_err(|e| ApiError::invalid("messages", e.0))?
    };
    let max_tokens = resolve_max_tokens(
        prompt.len(),
        req.max_completion_tokens.or(req.max_tokens),
        state.engine.info(),
    )?;
    let request = GenerateRequest {
        prompt,
        params,
        max_tokens,
        stop_tokens: state.stop_tokens(req.sampling.ignore_eos),
    };
    let text = state.generate(request, stops)?;
    let meta = ChatMeta {
        id: new_id("chatcmpl-"),
        created: unix_now(),
        model: state.model_name.clone(),
        fingerprint: state.fingerprint.clone(),
        codec,
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream_chat(text, meta, include_usage))
    } else {
        let c = collect(text).await?;
        let logprobs = req.logprobs.then(|| logprobs_json(&meta.codec, &c.tokens));
        Ok(Json(ChatCompletion {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: c.text,
                },
                logprobs,
                finish_reason: c.reason.map(FinishReason::as_str),
            }],
            usage: c.usage.into(),
            system_fingerprint: meta.fingerprint,
        })
        .into_response())
    }
}

/// Validates roles and flattens content parts into the template's plain messages.
pub fn to_template_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("unknown role '{}' (expected one of {})", m.role, ROLES.join(", ")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content part type '{kind}' is not supported (only text)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system" } else { &m.role };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

struct ChatMeta {
    id: String,
    created: i64,
    model: String,
    fingerprint: String,
    codec: Arc<TextCodec>,
}

impl ChatMeta {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageOut>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: self.fingerprint.clone(),
        })
    }

    fn delta(&self, delta: ChatDelta, logprobs: Option<Value>, finish: Option<FinishReason>) -> Event {
        self.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish.map(FinishReason::as_str),
            }],
            None,
        )
    }
}

enum Phase {
    Start,
    Body,
    Usage(UsageOut),
    Done,
    End,
}

fn stream_chat(text: TextStream, meta: ChatMeta, include_usage: bool) -> Response {
    let events = futures::stream::unfold((text, meta, Phase::Start), move |(mut text, meta, phase)| async move {
        let (event, next) = match phase {
            Phase::Start => {
                let delta = ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                (meta.delta(delta, None, None), Phase::Body)
            }
            Phase::Body => match text.next().await {
                Some(StreamItem::Delta { text: t, tokens }) => {
                    let has_logprobs = tokens.iter().any(|t| t.logprobs.is_some());
                    let logprobs = has_logprobs.then(|| logprobs_json(&meta.codec, &tokens));
                    let delta = ChatDelta {
                        role: None,
                        content: Some(t),
                    };
                    (meta.delta(delta, logprobs, None), Phase::Body)
                }
                Some(StreamItem::Done { reason, usage }) => {
                    let next = if include_usage {
                        Phase::Usage(usage.into())
                    } else {
                        Phase::Done
                    };
                    (meta.delta(ChatDelta::default(), None, Some(reason)), next)
                }
                Some(StreamItem::Error(e)) => (json_event(&ApiError::from(e).openai_body()), Phase::End),
                None => (Event::default().data("[DONE]"), Phase::End),
            },
            Phase::Usage(usage) => (meta.chunk(Vec::new(), Some(usage)), Phase::Done),
            Phase::Done => (Event::default().data("[DONE]"), Phase::End),
            Phase::End => return None,
        };
        Some((Ok::<_, Infallible>(event), (text, meta, next)))
    });
    sse_response(events)
}

/// `{"content": [{token, logprob, bytes, top_logprobs}]}` for the given tokens.
pub fn logprobs_json(codec: &TextCodec, tokens: &[GeneratedToken]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(codec, id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .filter_map(|t| {
            let lp = t.logprobs.as_ref()?;
            let mut e = entry(t.id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|a| entry(a.id, a.logprob)).collect();
            Some(e)
        })
        .collect();
    json!({ "content": content })
}

/// The text of a single token, special tokens included.
pub fn token_text(codec: &TextCodec, id: u32) -> String {
    codec.tokenizer().decode(&[id], false).unwrap_or_default()
}
