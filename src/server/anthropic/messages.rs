//! `POST /v1/messages` and `POST /v1/messages/count_tokens`.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::types::{MessagesContent, MessagesReply, MessagesRequest, MessagesTurn, MessagesUsage, TokenCount};
use super::{AnthropicError, AnthropicJson};
use crate::output::{collect, StreamItem, TextStream};
use crate::request::{FinishReason, GenerationSpec, MaxTokens, Prompt, RequestError, SamplingParams, Usage};
use crate::server::image_urls::{is_remote, RemoteImages};
use crate::server::openai::{choices, new_id};
use crate::server::{images, AppState};
use crate::text::grammar::OutputConstraint;
use crate::text::tools::{ToolCall, ToolChoice, ToolSet};
use crate::text::{ChatImage, ChatMessage, ChatPrompt, ReasoningMode};

/// Generates the assistant's next message, as one JSON object or Anthropic's event stream.
#[utoipa::path(post, path = "/v1/messages", tag = "anthropic", request_body = MessagesRequest,
    responses((status = 200,
        description = "The message; with `stream`, SSE events from `message_start` to `message_stop`",
        content((MessagesReply = "application/json"), (Object = "text/event-stream")))))]
#[tracing::instrument(skip_all)]
pub async fn messages(
    State(state): State<AppState>,
    AnthropicJson(req): AnthropicJson<MessagesRequest>,
) -> Result<Response, AnthropicError> {
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| AnthropicError::invalid("max_tokens", "max_tokens: Field required"))?;
    let remote = remote_images(&state, &req).await?;
    let spec = to_spec(&req, Some(max_tokens), state.reasoning, &remote)?;
    let model = state.model(req.model.as_deref()).await?;
    let request = state.validate(&model, spec).await?;
    let prompt_tokens = request.prompt().len() as u32;
    let stream = choices::start(&state, &model, vec![request], 1).await?.remove(0);
    let reply = Reply {
        id: new_id("msg_"),
        model: model.name().to_string(),
    };
    if req.stream {
        return Ok(reply.stream(stream, prompt_tokens));
    }
    let c = collect(stream).await?;
    let mut content = Vec::new();
    if !c.reasoning.is_empty() {
        content.push(thinking_block(&c.reasoning));
    }
    if !c.text.is_empty() {
        content.push(json!({"type": "text", "text": c.text}));
    }
    content.extend(c.tool_calls.iter().map(|call| tool_use_block(call, true)));
    Ok(Json(MessagesReply {
        id: reply.id,
        kind: "message",
        role: "assistant",
        model: reply.model,
        content,
        stop_reason: c.reason.map(|r| stop_reason(r, c.stop_sequence.is_some())),
        stop_sequence: c.stop_sequence,
        usage: usage(&c.usage),
    })
    .into_response())
}

/// Counts the tokens of the prompt a request would send to the model (template applied:
/// system, tools and messages), without generating.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic", request_body = MessagesRequest,
    responses((status = 200, description = "The prompt's token count", body = TokenCount)))]
pub async fn count_tokens(
    State(state): State<AppState>,
    AnthropicJson(req): AnthropicJson<MessagesRequest>,
) -> Result<Json<TokenCount>, AnthropicError> {
    let remote = remote_images(&state, &req).await?;
    let spec = to_spec(&req, None, state.reasoning, &remote)?;
    let model = state.model(req.model.as_deref()).await?;
    let input_tokens = match state.validate(&model, spec).await {
        Ok(request) => request.prompt().len(),
        // A conversation past the context is counted too: agents count to decide to compact.
        Err(RequestError::ContextLength { prompt, .. }) => prompt,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(TokenCount { input_tokens }))
}

/// Anthropic's `stop_reason` for how a generation ended.
fn stop_reason(reason: FinishReason, by_stop_sequence: bool) -> &'static str {
    match reason {
        FinishReason::Stop if by_stop_sequence => "stop_sequence",
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
    }
}

/// The engine's usage as Anthropic splits it: prompt tokens computed vs read from the cache.
fn usage(u: &Usage) -> MessagesUsage {
    MessagesUsage {
        input_tokens: u.prompt_tokens.saturating_sub(u.cached_tokens),
        output_tokens: u.completion_tokens,
        cache_read_input_tokens: u.cached_tokens,
        cache_creation_input_tokens: 0,
    }
}

fn thinking_block(thinking: &str) -> Value {
    json!({"type": "thinking", "thinking": thinking, "signature": ""})
}

/// A call as a `tool_use` block: its input parsed (`with_input`), or `{}` for a stream's
/// block start (the input follows as `input_json_delta`).
fn tool_use_block(call: &ToolCall, with_input: bool) -> Value {
    let input = if with_input {
        serde_json::from_str(&call.arguments).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a parsed tool call's arguments are not JSON");
            Value::Object(Map::new())
        })
    } else {
        Value::Object(Map::new())
    };
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
}

/// The `url` image sources of a request's turns, fetched as the server's `--allow-image-urls`
/// allows (a refused or failed one is a 400 naming its source).
async fn remote_images(state: &AppState, req: &MessagesRequest) -> Result<RemoteImages, AnthropicError> {
    let mut urls = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let MessagesContent::Blocks(blocks) = &m.content else {
            continue;
        };
        for (j, block) in blocks.iter().enumerate() {
            let source = block
                .get("source")
                .filter(|_| block.get("type") == Some(&json!("image")));
            if let Some(url) = source
                .filter(|s| s.get("type") == Some(&json!("url")))
                .and_then(|s| s.get("url"))
                .and_then(Value::as_str)
                .filter(|u| is_remote(u))
            {
                urls.push((format!("messages.{i}.content.{j}.source.url"), url.to_string()));
            }
        }
    }
    state
        .image_urls
        .fetch_all(urls)
        .await
        .map_err(|(field, e)| AnthropicError::invalid(&field, format!("{field}: {e}")))
}

/// The wire request as an API-neutral spec; `max_tokens` None for counting tokens; `url`
/// image sources are among the `remote` images fetched for it.
fn to_spec(
    req: &MessagesRequest,
    max_tokens: Option<u32>,
    reasoning: ReasoningMode,
    remote: &RemoteImages,
) -> Result<GenerationSpec, AnthropicError> {
    if let Some(name) = req.unknown.keys().find(|k| !ADVISORY.contains(&k.as_str())) {
        return Err(AnthropicError::invalid(
            name,
            format!("{name}: Extra inputs are not permitted (this server does not implement it)"),
        ));
    }
    if let Some(meta) = req.metadata.as_ref().filter(|m| !m.is_null() && !m.is_object()) {
        return Err(AnthropicError::invalid(
            "metadata",
            format!("metadata must be an object, got {meta}"),
        ));
    }
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        let text = plain_text(system, "system")?;
        if !text.is_empty() {
            messages.push(ChatMessage::new("system", text));
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        append_turn(&mut messages, m, &format!("messages.{i}"), remote)?;
    }
    if let Some(keep) = thinking_turns_kept(req.context_management.as_ref())? {
        clear_old_thoughts(&mut messages, keep);
    }
    let mut chat = ChatPrompt::new(messages);
    chat.tools = tool_set(req)?;
    chat.reasoning = reasoning;
    if let Some(thinking) = req.thinking.as_ref().filter(|t| !t.is_null()) {
        let (enabled, shown) = read_thinking(thinking, max_tokens)?;
        chat.template_kwargs
            .insert("enable_thinking".into(), Value::Bool(enabled));
        if !enabled || !shown {
            chat.reasoning = ReasoningMode::Drop;
        }
    }
    let (effort, constraint) = read_output_config(req.output_config.as_ref())?;
    if let Some(effort) = effort {
        chat.template_kwargs
            .insert("reasoning_effort".into(), Value::String(effort));
    }
    let mut spec = GenerationSpec::new(Prompt::Chat(chat));
    let top_k = match req.top_k {
        None => None,
        Some(k) if k >= 1 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(AnthropicError::invalid(
                "top_k",
                format!("top_k: Input should be greater than or equal to 1, got {k}"),
            ))
        }
    };
    spec.sampling = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k,
        ..SamplingParams::default()
    };
    spec.constraint = constraint;
    // A cap, as in Anthropic's API: a reply ends at the context's end without an error.
    spec.max_tokens = max_tokens.map_or(MaxTokens::Rest, MaxTokens::AtMost);
    spec.stop = req.stop_sequences.clone().unwrap_or_default();
    Ok(spec)
}

/// Top-level fields accepted without effect here, each for a reason: `cache_control` (the
/// prefix cache is automatic), `service_tier`, `speed` and `inference_geo` (one local tier),
/// `diagnostics` (no cache-miss report yet), `user_profile_id` and `workspace_id` (the caller's
/// tags, like `metadata`).
const ADVISORY: [&str; 7] = [
    "cache_control",
    "service_tier",
    "speed",
    "inference_geo",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
];

/// `thinking` as (whether the template thinks, whether thoughts are returned): `enabled` (with
/// a `budget_tokens` of at least 1024 below `max_tokens`, as Anthropic's API requires; like
/// Anthropic's, a target the model's template decides how to spend), `adaptive` and
/// `between_tools` (the model decides), `disabled`; `display: omitted` drops the thought.
fn read_thinking(thinking: &Value, max_tokens: Option<u32>) -> Result<(bool, bool), AnthropicError> {
    let kind = thinking.get("type").and_then(Value::as_str).unwrap_or("");
    let known: &[&str] = match kind {
        "enabled" => &["type", "budget_tokens", "display"],
        "adaptive" => &["type", "display"],
        "between_tools" | "disabled" => &["type"],
        _ => {
            return Err(AnthropicError::invalid(
                "thinking.type",
                "thinking.type must be enabled (with budget_tokens), adaptive, between_tools or disabled",
            ))
        }
    };
    if let Some(key) = thinking
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        return Err(AnthropicError::invalid(
            &format!("thinking.{kind}.{key}"),
            format!("thinking.{kind}.{key}: Extra inputs are not permitted"),
        ));
    }
    let shown = match thinking.get("display") {
        None | Some(Value::Null) => true,
        Some(v) if v == "summarized" => true,
        Some(v) if v == "omitted" => false,
        Some(other) => {
            return Err(AnthropicError::invalid(
                &format!("thinking.{kind}.display"),
                format!("thinking.{kind}.display must be summarized or omitted, got {other}"),
            ))
        }
    };
    if kind == "enabled" {
        let budget = thinking.get("budget_tokens").and_then(Value::as_u64).ok_or_else(|| {
            AnthropicError::invalid("thinking.enabled.budget_tokens", "budget_tokens: Field required")
        })?;
        if budget < 1024 {
            return Err(AnthropicError::invalid(
                "thinking.enabled.budget_tokens",
                "budget_tokens: Input should be greater than or equal to 1024",
            ));
        }
        if max_tokens.is_some_and(|m| budget >= u64::from(m)) {
            return Err(AnthropicError::invalid(
                "max_tokens",
                "max_tokens must be greater than thinking.budget_tokens",
            ));
        }
    }
    Ok((kind != "disabled", shown))
}

/// `output_config`: `effort` (low … max, the template's `reasoning_effort`) and `format`
/// (`{"type": "json_schema", "schema": …}`, decoded under the schema).
fn read_output_config(config: Option<&Value>) -> Result<(Option<String>, Option<OutputConstraint>), AnthropicError> {
    let Some(config) = config.filter(|c| !c.is_null()) else {
        return Ok((None, None));
    };
    let Some(obj) = config.as_object() else {
        return Err(AnthropicError::invalid(
            "output_config",
            "output_config must be an object",
        ));
    };
    if let Some(key) = obj.keys().find(|k| !["effort", "format"].contains(&k.as_str())) {
        return Err(AnthropicError::invalid(
            &format!("output_config.{key}"),
            format!("output_config.{key}: Extra inputs are not permitted"),
        ));
    }
    let effort = match obj.get("effort") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) if ["low", "medium", "high", "xhigh", "max"].contains(&e.as_str()) => Some(e.clone()),
        Some(other) => {
            return Err(AnthropicError::invalid(
                "output_config.effort",
                format!("output_config.effort must be low, medium, high, xhigh or max, got {other}"),
            ))
        }
    };
    let constraint = match obj.get("format") {
        None | Some(Value::Null) => None,
        Some(format) => {
            let schema = format
                .get("schema")
                .filter(|s| s.is_object() || s.is_boolean())
                .filter(|_| format.get("type").and_then(Value::as_str) == Some("json_schema"))
                .filter(|_| format.as_object().is_some_and(|o| o.len() == 2));
            let Some(schema) = schema else {
                return Err(AnthropicError::invalid(
                    "output_config.format",
                    "output_config.format must be {\"type\": \"json_schema\", \"schema\": {…}}",
                ));
            };
            Some(OutputConstraint::JsonSchema(schema.clone()))
        }
    };
    Ok((effort, constraint))
}

/// Appends one wire turn to the template's messages: a user turn's tool results become `tool`
/// messages (in block order, its text between them as user messages); an assistant turn's
/// blocks become one message with its text, thought and calls; a system turn stays one.
fn append_turn(
    out: &mut Vec<ChatMessage>,
    m: &MessagesTurn,
    at: &str,
    remote: &RemoteImages,
) -> Result<(), AnthropicError> {
    if let Some(name) = m.unknown.keys().next() {
        return Err(AnthropicError::invalid(
            &format!("{at}.{name}"),
            "Extra inputs are not permitted",
        ));
    }
    let blocks = match &m.content {
        MessagesContent::Text(text) => vec![json!({"type": "text", "text": text})],
        MessagesContent::Blocks(blocks) => blocks.clone(),
    };
    match m.role.as_str() {
        "user" => {
            let (mut text, mut pictures) = (String::new(), Vec::new());
            let user = |text: &mut String, pictures: &mut Vec<ChatImage>| {
                let mut message = ChatMessage::new("user", std::mem::take(text));
                message.images = std::mem::take(pictures);
                message
            };
            for (j, block) in blocks.iter().enumerate() {
                let at = format!("{at}.content.{j}");
                match read_block(block, &at, &["text", "image", "tool_result"])? {
                    Block::Text(t) => join(&mut text, &t),
                    Block::Image(ImageSource::Bytes(bytes)) => pictures.push(images::chat_image(bytes, text.len())),
                    Block::Image(ImageSource::Url(url)) => {
                        let field = format!("{at}.source.url");
                        let bytes = remote
                            .bytes(&url)
                            .map_err(|e| AnthropicError::invalid(&field, format!("{field}: {e}")))?;
                        pictures.push(images::chat_image(bytes, text.len()));
                    }
                    Block::ToolResult { id, content } => {
                        if !text.is_empty() || !pictures.is_empty() {
                            out.push(user(&mut text, &mut pictures));
                        }
                        let mut result = ChatMessage::new("tool", content);
                        result.tool_call_id = Some(id);
                        out.push(result);
                    }
                    _ => unreachable!("read_block returns only the kinds asked for"),
                }
            }
            if !text.is_empty() || !pictures.is_empty() || blocks.is_empty() {
                out.push(user(&mut text, &mut pictures));
            }
        }
        "assistant" => {
            let (mut text, mut thought, mut calls) = (String::new(), String::new(), Vec::new());
            for (j, block) in blocks.iter().enumerate() {
                let at = format!("{at}.content.{j}");
                match read_block(block, &at, &["text", "tool_use", "thinking"])? {
                    Block::Text(t) => join(&mut text, &t),
                    Block::Thinking(t) => join(&mut thought, &t),
                    Block::ToolUse { id, name, input } => calls.push(json!({
                        "id": id, "type": "function", "function": {"name": name, "arguments": input},
                    })),
                    Block::ToolResult { .. } | Block::Image(_) => {
                        unreachable!("read_block returns only the kinds asked for")
                    }
                }
            }
            let mut message = ChatMessage::new("assistant", text);
            message.reasoning_content = (!thought.is_empty()).then_some(thought);
            message.tool_calls = (!calls.is_empty()).then_some(calls);
            out.push(message);
        }
        // Claude Code sends context (the agent types it offers) as a system turn among the
        // messages; it renders where it stands, as templates render a later system turn.
        "system" => {
            let text = plain_text(&m.content, &format!("{at}.content"))?;
            out.push(ChatMessage::new("system", text));
        }
        other => {
            return Err(AnthropicError::invalid(
                &format!("{at}.role"),
                format!("{at}.role: Input should be 'user', 'assistant' or 'system', got '{other}'"),
            ))
        }
    }
    Ok(())
}

/// The bytes of an image block's `source`: `{"type": "base64", "media_type": …, "data": …}`.
/// An image block's source: its bytes (base64), or a URL fetched before conversion.
enum ImageSource {
    Bytes(Vec<u8>),
    Url(String),
}

/// A base64 or URL source (the URL is fetched only under `--allow-image-urls`); file sources
/// are refused: mlxd keeps no files.
fn image_source(source: Option<&Value>, at: &str) -> Result<ImageSource, AnthropicError> {
    let invalid = |message: String| AnthropicError::invalid(at, format!("{at}: {message}"));
    let Some(source) = source.and_then(Value::as_object) else {
        return Err(invalid("Field required (an object)".into()));
    };
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {}
        Some("url") => {
            if let Some(key) = source.keys().find(|k| !["type", "url"].contains(&k.as_str())) {
                return Err(invalid(format!("{key}: Extra inputs are not permitted")));
            }
            let url = source.get("url").and_then(Value::as_str);
            let url = url.ok_or_else(|| invalid("url: Field required (a string)".into()))?;
            return Ok(ImageSource::Url(url.to_string()));
        }
        Some(other) => {
            return Err(invalid(format!(
                "'{other}' sources are not supported (base64, or url under --allow-image-urls)"
            )))
        }
        None => return Err(invalid("type: Field required".into())),
    }
    if let Some(key) = source
        .keys()
        .find(|k| !["type", "media_type", "data"].contains(&k.as_str()))
    {
        return Err(invalid(format!("{key}: Extra inputs are not permitted")));
    }
    match source.get("media_type").and_then(Value::as_str) {
        Some("image/png" | "image/jpeg" | "image/webp" | "image/gif") => {}
        other => {
            return Err(invalid(format!(
                "media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp', got {other:?}"
            )))
        }
    }
    let data = source
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("data: Field required (a string)".into()))?;
    let bytes = images::from_base64(data).map_err(|e| invalid(format!("data {e}")))?;
    Ok(ImageSource::Bytes(bytes))
}

/// Appends a block's text to what came before, a blank line between them.
fn join(text: &mut String, more: &str) {
    if !text.is_empty() && !more.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(more);
}

/// One content block of the conversation, read.
enum Block {
    Text(String),
    Image(ImageSource),
    Thinking(String),
    ToolUse { id: String, name: String, input: Value },
    ToolResult { id: String, content: String },
}

/// Reads a content block of one of the `allowed` types; every key it carries is used or
/// accepted (`cache_control`: the prefix cache works without hints), any other is refused.
fn read_block(block: &Value, at: &str, allowed: &[&str]) -> Result<Block, AnthropicError> {
    let Some(obj) = block.as_object() else {
        return Err(AnthropicError::invalid(
            at,
            format!("{at}: a content block must be an object"),
        ));
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if !allowed.contains(&kind) {
        return Err(AnthropicError::invalid(
            &format!("{at}.type"),
            format!(
                "{at}.type: '{kind}' blocks are not accepted here (expected one of {}; documents are not supported)",
                allowed.join(", ")
            ),
        ));
    }
    let known: &[&str] = match kind {
        "text" => &["type", "text", "cache_control", "citations"],
        "thinking" => &["type", "thinking", "signature", "cache_control"],
        "image" => &["type", "source", "cache_control"],
        // `caller` (who made the call) and `toolset_name` (an MCP toolset) only label it.
        "tool_use" => &["type", "id", "name", "input", "cache_control", "caller", "toolset_name"],
        _ => &[
            "type",
            "tool_use_id",
            "content",
            "is_error",
            "cache_control",
            "toolset_name",
        ],
    };
    if let Some(key) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(AnthropicError::invalid(
            &format!("{at}.{key}"),
            format!("{at}.{key}: Extra inputs are not permitted"),
        ));
    }
    let string = |key: &str| -> Result<String, AnthropicError> {
        obj.get(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            AnthropicError::invalid(&format!("{at}.{key}"), format!("{at}.{key}: Field required (a string)"))
        })
    };
    Ok(match kind {
        "text" => Block::Text(string("text")?),
        "image" => Block::Image(image_source(obj.get("source"), &format!("{at}.source"))?),
        "thinking" => Block::Thinking(string("thinking")?),
        "tool_use" => {
            let input = obj.get("input").cloned().unwrap_or(Value::Null);
            if !input.is_object() {
                return Err(AnthropicError::invalid(
                    &format!("{at}.input"),
                    format!("{at}.input: must be an object"),
                ));
            }
            Block::ToolUse {
                id: string("id")?,
                name: string("name")?,
                input,
            }
        }
        _ => {
            let text = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (k, part) in parts.iter().enumerate() {
                        match read_block(part, &format!("{at}.content.{k}"), &["text"])? {
                            Block::Text(t) => join(&mut text, &t),
                            _ => unreachable!("only text is asked for"),
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(AnthropicError::invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: must be a string or text blocks"),
                    ))
                }
            };
            let is_error = match obj.get("is_error") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(AnthropicError::invalid(
                        &format!("{at}.is_error"),
                        format!("{at}.is_error: must be a boolean"),
                    ))
                }
            };
            Block::ToolResult {
                id: string("tool_use_id")?,
                // The template has no field for a failed call: the model reads it in the text.
                content: if is_error { format!("Error: {text}") } else { text },
            }
        }
    })
}

/// `system` as one text. A block that is Claude Code's billing header
/// (`x-anthropic-billing-header: cc_version=…`, which changes between requests) is left out:
/// it is metadata for Anthropic's accounting, and at the head of the prompt it would make
/// every request miss the prefix cache.
fn plain_text(content: &MessagesContent, at: &str) -> Result<String, AnthropicError> {
    match content {
        MessagesContent::Text(text) => Ok(text.clone()),
        MessagesContent::Blocks(blocks) => {
            let mut text = String::new();
            for (j, block) in blocks.iter().enumerate() {
                match read_block(block, &format!("{at}.{j}"), &["text"])? {
                    Block::Text(t) if t.starts_with(BILLING_HEADER) => {}
                    Block::Text(t) => join(&mut text, &t),
                    _ => unreachable!("only text is asked for"),
                }
            }
            Ok(text)
        }
    }
}

/// How Claude Code's billing header block starts.
const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// `context_management`: its one edit mlxd applies, `clear_thinking_20251015` (`keep`: `all`,
/// or `{"type": "thinking_turns", "value": N}`: the thoughts of the last N assistant turns),
/// as the number of turns whose thoughts stay (None: all). Other edits are refused by name.
fn thinking_turns_kept(config: Option<&Value>) -> Result<Option<usize>, AnthropicError> {
    let Some(config) = config.filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    let edits = match config.as_object() {
        Some(obj) if obj.keys().all(|k| k == "edits") => obj.get("edits").and_then(Value::as_array),
        _ => None,
    };
    let Some(edits) = edits else {
        return Err(AnthropicError::invalid(
            "context_management",
            "context_management must be {\"edits\": [...]}",
        ));
    };
    let mut kept = None;
    for (i, edit) in edits.iter().enumerate() {
        let at = format!("context_management.edits.{i}");
        match edit.get("type").and_then(Value::as_str) {
            Some("clear_thinking_20251015") => {}
            other => {
                return Err(AnthropicError::invalid(
                    &format!("{at}.type"),
                    format!(
                        "{at}.type: '{}' is not supported (only clear_thinking_20251015)",
                        other.unwrap_or("")
                    ),
                ))
            }
        }
        kept = match edit.get("keep") {
            None | Some(Value::Null) => Some(1),
            Some(v) if v == "all" => None,
            Some(v) if v.get("type").and_then(Value::as_str) == Some("thinking_turns") => {
                let n = v.get("value").and_then(Value::as_u64).filter(|&n| n >= 1);
                Some(n.ok_or_else(|| {
                    AnthropicError::invalid(
                        &format!("{at}.keep.value"),
                        format!("{at}.keep.value must be at least 1"),
                    )
                })? as usize)
            }
            Some(other) => {
                return Err(AnthropicError::invalid(
                    &format!("{at}.keep"),
                    format!("{at}.keep must be \"all\" or {{\"type\": \"thinking_turns\", \"value\": N}}, got {other}"),
                ))
            }
        };
    }
    Ok(kept)
}

/// Drops the thoughts of all assistant turns but the last `keep`.
fn clear_old_thoughts(messages: &mut [ChatMessage], keep: usize) {
    let mut seen = 0;
    for m in messages.iter_mut().rev().filter(|m| m.role == "assistant") {
        seen += 1;
        if seen > keep {
            m.reasoning_content = None;
        }
    }
}

/// `tools` (client tools: `name`, `description`, `input_schema`) as the template's function
/// tools, and `tool_choice` (`auto`, `any`, `tool` with a `name`, `none`;
/// `disable_parallel_tool_use`).
fn tool_set(req: &MessagesRequest) -> Result<ToolSet, AnthropicError> {
    let mut tools = Vec::new();
    for (i, tool) in req.tools.iter().flatten().enumerate() {
        let at = format!("tools.{i}");
        let Some(obj) = tool.as_object() else {
            return Err(AnthropicError::invalid(&at, format!("{at}: a tool must be an object")));
        };
        match obj.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(other) => {
                return Err(AnthropicError::invalid(
                    &format!("{at}.type"),
                    format!("{at}.type: server tool '{other}' is not supported; only client tools (name, description, input_schema)"),
                ))
            }
        }
        // Accepted without effect: `cache_control`, `defer_loading` (every tool is loaded),
        // `allowed_callers`, `eager_input_streaming` (inputs stream whole once parsed), `strict`
        // (forced calls follow the schema; free ones are parsed, not constrained).
        const KNOWN: [&str; 10] = [
            "type",
            "name",
            "description",
            "input_schema",
            "input_examples",
            "cache_control",
            "defer_loading",
            "allowed_callers",
            "eager_input_streaming",
            "strict",
        ];
        if let Some(key) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(AnthropicError::invalid(
                &format!("{at}.{key}"),
                format!("{at}.{key}: Extra inputs are not permitted"),
            ));
        }
        let name = obj.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
        let Some(name) = name else {
            return Err(AnthropicError::invalid(
                &format!("{at}.name"),
                format!("{at}.name: Field required"),
            ));
        };
        let Some(schema) = obj.get("input_schema").filter(|s| s.is_object()) else {
            return Err(AnthropicError::invalid(
                &format!("{at}.input_schema"),
                format!("{at}.input_schema: Field required (a JSON schema object)"),
            ));
        };
        let mut function = json!({"name": name, "parameters": schema});
        let mut description = obj.get("description").and_then(Value::as_str).unwrap_or("").to_string();
        // Example inputs reach the model in the description, the one place templates show.
        if let Some(examples) = obj
            .get("input_examples")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            let shown: Vec<String> = examples.iter().map(Value::to_string).collect();
            join(&mut description, &format!("Example inputs: {}", shown.join("; ")));
        }
        if !description.is_empty() {
            function["description"] = Value::String(description);
        }
        tools.push(json!({"type": "function", "function": function}));
    }
    let (choice, parallel) = match &req.tool_choice {
        None | Some(Value::Null) => (
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            },
            true,
        ),
        Some(choice) => {
            let parallel = !choice
                .get("disable_parallel_tool_use")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let kind = choice.get("type").and_then(Value::as_str);
            let choice = match (kind, choice.get("name").and_then(Value::as_str)) {
                (Some("auto"), _) => ToolChoice::Auto,
                (Some("any"), _) => ToolChoice::Required,
                (Some("none"), _) => ToolChoice::None,
                (Some("tool"), Some(name)) => ToolChoice::Function(name.to_string()),
                _ => {
                    return Err(AnthropicError::invalid(
                        "tool_choice",
                        "tool_choice must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": …}",
                    ))
                }
            };
            (choice, parallel)
        }
    };
    if let ToolChoice::Function(name) = &choice {
        if !tools.iter().any(|t| t["function"]["name"] == name.as_str()) {
            return Err(AnthropicError::invalid(
                "tool_choice.name",
                format!("tool_choice.name: no tool named '{name}' among the tools"),
            ));
        }
    }
    if matches!(choice, ToolChoice::Required) && tools.is_empty() {
        return Err(AnthropicError::invalid("tool_choice", "tool_choice 'any' needs tools"));
    }
    Ok(ToolSet {
        tools,
        choice,
        parallel,
    })
}

/// How long a stream stays silent before a `ping` event.
const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What every event of one reply names.
struct Reply {
    id: String,
    model: String,
}

/// Which content block is open in a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Thinking,
    Text,
}

/// A stream's block bookkeeping: the index of the next block, and which one is open.
struct Blocks {
    next: usize,
    open: Open,
}

impl Blocks {
    /// Events that make `kind` the open block (closing another first).
    fn ensure(&mut self, kind: Open, events: &mut Vec<Event>) {
        if self.open == kind {
            return;
        }
        self.close(events);
        let block = match kind {
            Open::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            _ => json!({"type": "text", "text": ""}),
        };
        events.push(event(
            json!({"type": "content_block_start", "index": self.next, "content_block": block}),
        ));
        self.open = kind;
    }

    /// Closes the open block, if any.
    fn close(&mut self, events: &mut Vec<Event>) {
        if self.open != Open::None {
            events.push(event(json!({"type": "content_block_stop", "index": self.next})));
            self.next += 1;
            self.open = Open::None;
        }
    }

    /// A delta of the open block.
    fn delta(&self, delta: Value) -> Event {
        event(json!({"type": "content_block_delta", "index": self.next, "delta": delta}))
    }
}

/// An SSE event named by its JSON `type`, as Anthropic sends them.
fn event(data: Value) -> Event {
    let name = data["type"].as_str().unwrap_or("message").to_string();
    Event::default().event(name).data(data.to_string())
}

impl Reply {
    /// The reply as Anthropic's event stream.
    fn stream(self, stream: TextStream, prompt_tokens: u32) -> Response {
        let cached = stream.cached_tokens();
        let start = event(json!({
            "type": "message_start",
            "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": usage(&Usage {
                    prompt_tokens,
                    cached_tokens: cached,
                    ..Usage::default()
                }),
            },
        }));
        let ping = event(json!({"type": "ping"}));
        let mut blocks = Blocks {
            next: 0,
            open: Open::None,
        };
        let mut ended = false;
        let body = choices::merged(vec![stream]).map(move |(_, item)| {
            let mut events = Vec::new();
            if ended {
                return events;
            }
            match item {
                StreamItem::Delta {
                    text,
                    reasoning,
                    tool_calls,
                    ..
                } => {
                    if !reasoning.is_empty() {
                        blocks.ensure(Open::Thinking, &mut events);
                        events.push(blocks.delta(json!({"type": "thinking_delta", "thinking": reasoning})));
                    }
                    if !text.is_empty() {
                        blocks.ensure(Open::Text, &mut events);
                        events.push(blocks.delta(json!({"type": "text_delta", "text": text})));
                    }
                    for call in &tool_calls {
                        blocks.close(&mut events);
                        events.push(event(json!({
                            "type": "content_block_start", "index": blocks.next,
                            "content_block": tool_use_block(call, false),
                        })));
                        events.push(blocks.delta(json!({"type": "input_json_delta", "partial_json": call.arguments})));
                        events.push(event(json!({"type": "content_block_stop", "index": blocks.next})));
                        blocks.next += 1;
                    }
                }
                StreamItem::Done {
                    reason,
                    usage: u,
                    stop_sequence,
                } => {
                    ended = true;
                    blocks.close(&mut events);
                    events.push(event(json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(reason, stop_sequence.is_some()), "stop_sequence": stop_sequence},
                        "usage": usage(&u),
                    })));
                    events.push(event(json!({"type": "message_stop"})));
                }
                StreamItem::Error(e) => {
                    ended = true;
                    let body = AnthropicError::from(e).body();
                    events.push(event(serde_json::to_value(body).unwrap_or_default()));
                }
            }
            events
        });
        let events = futures::stream::iter([start, ping])
            .chain(body.flat_map(futures::stream::iter))
            .map(Ok::<_, Infallible>);
        // While a long prompt is prefilled no event is due: `ping` events, as Anthropic sends
        // them, keep agents' stall watchdogs (Claude Code's cancels and retries a silent stream)
        // from giving up on it.
        let keep_alive = KeepAlive::new()
            .interval(PING_INTERVAL)
            .event(event(json!({"type": "ping"})));
        Sse::new(events).keep_alive(keep_alive).into_response()
    }
}
