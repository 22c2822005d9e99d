//! `POST /v1/chat/completions`.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};

use super::choices::{self, check_n, named_by_id, total_usage};
use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatMessageIn,
    ChatMessageOut, MessageContent, UsageOut,
};
use super::{
    check_stream_options, json_event, new_id, reject_unknown, response_constraint, sampling_params, sse_response,
    unix_now,
};
use crate::output::{GeneratedToken, StreamItem, TextStream};
use crate::request::{FinishReason, GenerationSpec, MaxTokens, Prompt, Usage};
use crate::server::error::{ApiError, AppJson};
use crate::server::AppState;
use crate::text::ChatMessage;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Generates the assistant's reply to a conversation (`n` of them), as one JSON object or an
/// SSE stream.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses((status = 200,
        description = "The reply; with `stream`, SSE `chat.completion.chunk` events ending in `data: [DONE]`",
        content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream")))))]
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    state.check_model(req.model.as_deref())?;
    let spec = to_spec(&req)?;
    let n = check_n(req.sampling.n, 1)?;
    let request = state.validate(spec).await?;
    let meta = ChatMeta {
        id: new_id("chatcmpl-"),
        created: unix_now(),
        model: state.model_name.clone(),
        fingerprint: state.fingerprint.clone(),
    };
    let streams = choices::start(&state, vec![request], n).await?;
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream_chat(
            streams,
            meta,
            include_usage,
            req.return_tokens_as_token_ids,
        ));
    }
    let results = choices::collect_all(streams).await?;
    let usages: Vec<Usage> = results.iter().map(|c| c.usage).collect();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i as u32,
            logprobs: req
                .logprobs
                .then(|| logprobs_json(&named_by_id(&c.tokens, req.return_tokens_as_token_ids))),
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
            finish_reason: c.reason.map(FinishReason::as_str),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: total_usage(&usages, n),
        system_fingerprint: meta.fingerprint,
    })
    .into_response())
}

/// The wire request as an API-neutral spec (OpenAI's defaults; ranges are checked later).
fn to_spec(req: &ChatCompletionRequest) -> Result<GenerationSpec, ApiError> {
    reject_unknown(&req.unknown, "")?;
    check_stream_options(req.stream, req.stream_options.as_ref())?;
    let constraint = response_constraint(req.response_format.as_ref())?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs requires logprobs to be true",
        ));
    }
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let mut spec = GenerationSpec::new(Prompt::Chat(to_template_messages(&req.messages)?));
    spec.sampling = sampling_params(&req.sampling, logprobs)?;
    spec.max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .map_or(MaxTokens::Rest, MaxTokens::Exactly);
    spec.stop = req.sampling.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    spec.ignore_eos = req.sampling.ignore_eos;
    spec.constraint = constraint;
    Ok(spec)
}

/// Validates roles and flattens content parts into the template's plain messages.
pub fn to_template_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            reject_unknown(&m.unknown, &format!("messages[{i}]."))?;
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

    fn delta(&self, index: usize, delta: ChatDelta, logprobs: Option<Value>, finish: Option<FinishReason>) -> Event {
        self.chunk(
            vec![ChatChunkChoice {
                index: index as u32,
                delta,
                logprobs,
                finish_reason: finish.map(FinishReason::as_str),
            }],
            None,
        )
    }
}

fn stream_chat(streams: Vec<TextStream>, meta: ChatMeta, include_usage: bool, by_id: bool) -> Response {
    let num_choices = streams.len();
    let meta = std::sync::Arc::new(meta);
    let starts: Vec<Event> = (0..num_choices)
        .map(|i| {
            let delta = ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            meta.delta(i, delta, None, None)
        })
        .collect();
    let mut usages = vec![Usage::default(); num_choices];
    let mut remaining = num_choices;
    let mut failed = false;
    let body_meta = meta.clone();
    let body = choices::merged(streams).map(move |(i, item)| {
        let meta = &body_meta;
        let mut events = Vec::new();
        if failed {
            return events;
        }
        match item {
            StreamItem::Delta { text, tokens } => {
                let has_logprobs = tokens.iter().any(|t| t.logprobs.is_some());
                let logprobs = has_logprobs.then(|| logprobs_json(&named_by_id(&tokens, by_id)));
                let delta = ChatDelta {
                    role: None,
                    content: Some(text),
                };
                events.push(meta.delta(i, delta, logprobs, None));
            }
            StreamItem::Done { reason, usage } => {
                usages[i] = usage;
                remaining -= 1;
                events.push(meta.delta(i, ChatDelta::default(), None, Some(reason)));
                if remaining == 0 {
                    if include_usage {
                        events.push(meta.chunk(Vec::new(), Some(total_usage(&usages, 1))));
                    }
                    events.push(Event::default().data("[DONE]"));
                }
            }
            StreamItem::Error(e) => {
                failed = true;
                events.push(json_event(&ApiError::from(e).openai_body()));
            }
        }
        events
    });
    let events = futures::stream::iter(starts)
        .chain(body.flat_map(futures::stream::iter))
        .map(Ok::<_, Infallible>);
    sse_response(events)
}

/// `{"content": [{token, logprob, bytes, top_logprobs}]}` for the given tokens, each token's
/// text as it reads in the message.
pub fn logprobs_json(tokens: &[GeneratedToken]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .filter_map(|t| {
            let lp = t.logprobs.as_ref()?;
            let mut e = entry(&t.text, lp.logprob);
            e["top_logprobs"] = lp
                .top
                .iter()
                .zip(&t.top_texts)
                .map(|(a, text)| entry(text, a.logprob))
                .collect();
            Some(e)
        })
        .collect();
    json!({ "content": content })
}
