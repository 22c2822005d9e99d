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
    ChatMessageOut, FunctionCallDelta, FunctionCallOut, MessageContent, Thought, ToolCallDelta, ToolCallIn,
    ToolCallOut, UsageOut,
};
use super::{
    check_stream_options, json_event, new_id, reject_unknown, response_constraint, sampling_params, sse_response,
    tool_choice_word, unix_now,
};
use crate::output::{GeneratedToken, StreamItem, TextStream};
use crate::request::{FinishReason, GenerationSpec, MaxTokens, Prompt, Usage};
use crate::server::error::{ApiError, AppJson};
use crate::server::image_urls::{is_remote, RemoteImages};
use crate::server::{fit, images, AppState};
use crate::text::tools::{ToolCall, ToolChoice, ToolSet};
use crate::text::{ChatMessage, ChatPrompt, ReasoningMode};

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
/// The values of an image part's `detail`.
const DETAILS: [&str; 3] = ["auto", "low", "high"];

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
    let remote = remote_images(&state, &req.messages).await?;
    let spec = to_spec(&req, state.reasoning, &remote)?;
    let n = check_n(req.sampling.n, 1)?;
    let model = state.model(req.model.as_deref()).await?;
    // A chat UI's conversation that outgrew a small context is fitted as Ollama fits it.
    let request = fit::validate_fitted(&state, &model, spec, !state.strict_context).await?;
    let meta = ChatMeta {
        id: new_id("chatcmpl-"),
        created: unix_now(),
        model: model.name().to_string(),
        fingerprint: model.fingerprint.clone(),
    };
    let streams = choices::start(&state, &model, vec![request], n).await?;
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
            message: message_out(c.text, c.reasoning, &c.tool_calls),
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

/// The reply as a response message: content null when the reply is only tool calls.
fn message_out(content: String, reasoning: String, calls: &[ToolCall]) -> ChatMessageOut {
    ChatMessageOut {
        role: "assistant",
        content: (!content.is_empty() || calls.is_empty()).then_some(content),
        thought: Thought::of(reasoning),
        tool_calls: (!calls.is_empty()).then(|| {
            calls
                .iter()
                .map(|c| ToolCallOut {
                    id: c.id.clone(),
                    kind: "function",
                    function: FunctionCallOut {
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    },
                })
                .collect()
        }),
    }
}

/// The wire request as an API-neutral spec (OpenAI's defaults; ranges are checked later);
/// `reasoning` is the server's default for thoughts.
fn to_spec(
    req: &ChatCompletionRequest,
    reasoning: ReasoningMode,
    remote: &RemoteImages,
) -> Result<GenerationSpec, ApiError> {
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
    let mut chat = ChatPrompt::new(to_template_messages(&req.messages, remote)?);
    chat.tools = tool_set(req)?;
    chat.template_kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(effort) = &req.reasoning_effort {
        chat.template_kwargs
            .insert("reasoning_effort".into(), Value::String(effort.clone()));
    }
    chat.reasoning = match req.include_reasoning {
        Some(false) => ReasoningMode::Drop,
        _ => reasoning,
    };
    let mut spec = GenerationSpec::new(Prompt::Chat(chat));
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

/// `tools`, `tool_choice` and `parallel_tool_calls` (their contents are checked once, in
/// validation).
fn tool_set(req: &ChatCompletionRequest) -> Result<ToolSet, ApiError> {
    let tools = req.tools.clone().unwrap_or_default();
    let choice =
        match &req.tool_choice {
            None if tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(Value::String(s)) => tool_choice_word(s)?,
            Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
                Some(name) if choice.get("type").and_then(Value::as_str) == Some("function") => {
                    ToolChoice::Function(name.to_string())
                }
                _ => return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": …}}",
                )),
            },
        };
    Ok(ToolSet {
        tools,
        choice,
        parallel: req.parallel_tool_calls.unwrap_or(true),
    })
}

/// The `http(s)` images of a conversation's `image_url` parts, fetched as the server's
/// `--allow-image-urls` allows (a refused or failed one is a 400 naming its part).
pub async fn remote_images(state: &AppState, messages: &[ChatMessageIn]) -> Result<RemoteImages, ApiError> {
    let mut urls = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(MessageContent::Parts(parts)) = &m.content {
            for (j, p) in parts.iter().enumerate() {
                if let Some(image) = p.image_url.as_ref().filter(|i| is_remote(&i.url)) {
                    urls.push((format!("messages[{i}].content[{j}].image_url.url"), image.url.clone()));
                }
            }
        }
    }
    state
        .image_urls
        .fetch_all(urls)
        .await
        .map_err(|(field, e)| ApiError::invalid(&field, e))
}

/// Validates roles and flattens content parts into the template's messages; image URLs are
/// `data:` URLs or among the `remote` images fetched for the request.
pub fn to_template_messages(messages: &[ChatMessageIn], remote: &RemoteImages) -> Result<Vec<ChatMessage>, ApiError> {
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
            let mut images = Vec::new();
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let at = format!("messages[{i}].content[{j}]");
                        // `cache_control` (Anthropic's caching hint, which proxies pass on)
                        // asks nothing of a server whose prefix cache needs no hints.
                        let mut unknown = p.unknown.clone();
                        unknown.remove("cache_control");
                        reject_unknown(&unknown, &format!("{at}."))?;
                        match (p.kind.as_str(), &p.text, &p.image_url) {
                            ("text", Some(t), _) => text.push_str(t),
                            ("image_url", _, Some(image)) => {
                                reject_unknown(&image.unknown, &format!("{at}.image_url."))?;
                                if let Some(detail) = image.detail.as_deref().filter(|d| !DETAILS.contains(d)) {
                                    return Err(ApiError::invalid(
                                        &format!("{at}.image_url.detail"),
                                        format!("unknown detail '{detail}' (expected one of {})", DETAILS.join(", ")),
                                    ));
                                }
                                let bytes = remote
                                    .bytes(&image.url)
                                    .map_err(|e| ApiError::invalid(&format!("{at}.image_url.url"), e))?;
                                images.push(images::chat_image(bytes, text.len()));
                            }
                            ("text" | "image_url", _, _) => {
                                return Err(ApiError::invalid(
                                    &at,
                                    format!("a '{}' part needs its '{}' field", p.kind, p.kind),
                                ))
                            }
                            (kind, _, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content part type '{kind}' is not supported (expected text or image_url)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system" } else { &m.role };
            let mut message = ChatMessage::new(role, content);
            message.images = images;
            message.name = m.name.clone();
            message.tool_call_id = m.tool_call_id.clone();
            message.reasoning_content = m.reasoning_content.clone().or_else(|| m.reasoning.clone());
            if let Some(calls) = &m.tool_calls {
                let calls = calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| template_call(c, &format!("messages[{i}].tool_calls[{j}]")));
                message.tool_calls = Some(calls.collect::<Result<_, _>>()?);
            }
            Ok(message)
        })
        .collect()
}

/// A call of the conversation as templates expect it: arguments as an object (OpenAI sends
/// a JSON string).
fn template_call(call: &ToolCallIn, at: &str) -> Result<Value, ApiError> {
    let arguments = match &call.function.arguments {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                &format!("{at}.function.arguments"),
                format!("arguments must be a JSON object: {e}"),
            )
        })?,
        other => other.clone(),
    };
    if !arguments.is_object() {
        return Err(ApiError::invalid(
            &format!("{at}.function.arguments"),
            "arguments must be a JSON object (or a string holding one)",
        ));
    }
    Ok(json!({
        "id": call.id,
        "type": call.kind.as_deref().unwrap_or("function"),
        "function": {"name": call.function.name, "arguments": arguments},
    }))
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
                ..Default::default()
            };
            meta.delta(i, delta, None, None)
        })
        .collect();
    let mut usages = vec![Usage::default(); num_choices];
    let mut calls_made = vec![0u32; num_choices];
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
            StreamItem::Delta {
                text,
                reasoning,
                tool_calls,
                tokens,
            } => {
                let has_logprobs = tokens.iter().any(|t| t.logprobs.is_some());
                let logprobs = has_logprobs.then(|| logprobs_json(&named_by_id(&tokens, by_id)));
                let only_calls =
                    text.is_empty() && reasoning.is_empty() && logprobs.is_none() && !tool_calls.is_empty();
                let delta = ChatDelta {
                    content: (!text.is_empty() || reasoning.is_empty()).then_some(text),
                    thought: Thought::of(reasoning),
                    ..Default::default()
                };
                if !only_calls {
                    events.push(meta.delta(i, delta, logprobs, None));
                }
                for call in tool_calls {
                    for piece in call_pieces(&call, calls_made[i]) {
                        events.push(meta.delta(i, piece, None, None));
                    }
                    calls_made[i] += 1;
                }
            }
            StreamItem::Done { reason, usage, .. } => {
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

/// A finished call as stream deltas, OpenAI-style: its id, type and name (with empty
/// arguments), then its argument text.
fn call_pieces(call: &ToolCall, index: u32) -> [ChatDelta; 2] {
    let piece = |id: Option<String>, name: Option<String>, arguments: String| ChatDelta {
        tool_calls: Some(vec![ToolCallDelta {
            index,
            kind: id.is_some().then_some("function"),
            id,
            function: FunctionCallDelta { name, arguments },
        }]),
        ..Default::default()
    };
    [
        piece(Some(call.id.clone()), Some(call.name.clone()), String::new()),
        piece(None, None, call.arguments.clone()),
    ]
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
