//! A Responses request as an API-neutral `GenerationSpec`: input items as the template's
//! messages, tools and `tool_choice`, `text.format`, `reasoning`, `include`. Every field and
//! item key is used or refused by name.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{json, Value};

use super::types::ResponsesRequest;
use crate::request::{GenerationSpec, MaxTokens, Prompt, SamplingParams};
use crate::server::error::ApiError;
use crate::server::image_urls::{is_remote, RemoteImages};
use crate::server::images;
use crate::server::openai::{reject_unknown_keys, response_constraint, tool_choice_word};
use crate::text::tools::{ToolChoice, ToolSet};
use crate::text::{ChatImage, ChatMessage, ChatPrompt, ReasoningMode};

/// A request read: the spec to generate from, and what shapes the answer.
pub struct Prepared {
    /// What to generate.
    pub spec: GenerationSpec,
    /// This request's own input items, as stored for a continuation (a text input becomes one
    /// user message item).
    pub input: Vec<Value>,
    /// How the output items are written.
    pub shape: OutputShape,
    /// `truncation: auto`: a conversation too long for the context drops its oldest turns.
    pub truncate: bool,
}

/// How output items are written, from `reasoning`, `include` and the tools.
#[derive(Clone, Debug, Default)]
pub struct OutputShape {
    /// The reasoning item carries its thought as a summary too (`reasoning.summary`).
    pub summary: bool,
    /// The reasoning item carries `encrypted_content` (`include`).
    pub encrypted: bool,
    /// Output text carries logprobs (`include`).
    pub logprobs: bool,
    /// The namespace of each tool that was offered inside one, by tool name: a call of it
    /// names the namespace, as Codex routes calls.
    pub namespaces: HashMap<String, String>,
}

/// Fields accepted without effect: the caller's tags, cache and tier hints, and Codex's
/// `client_metadata`.
const ADVISORY: [&str; 6] = [
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "client_metadata",
    "parallel_tool_calls_hint",
];

/// Tool types of hosted tools mlxd accepts without offering them: a client (Codex) sends them
/// with its function tools, and this server has no search to run.
const HOSTED_NOT_OFFERED: [&str; 2] = ["web_search", "web_search_preview"];

/// How `encrypted_content` starts: the base64 of this tag and the thought (this server keeps no
/// secret; the field lets a client that stores nothing hand the thought back).
const THOUGHT_TAG: &str = "mlxd-thought:";

/// Reads a request whose earlier conversation (the stored chain of `previous_response_id`, as
/// items) is `history`; `reasoning` is the server's default for thoughts.
/// The image URLs of the stored `history` and the request's input (`(field, url)`), fetched
/// before `prepare` where they are remote.
pub fn image_urls(req: &ResponsesRequest, history: &[Value]) -> Vec<(String, String)> {
    let items = input_items(req.input.as_ref()).unwrap_or_default();
    let stored = history.iter().map(|item| (None, item));
    let given = items.iter().enumerate().map(|(i, item)| (Some(i), item));
    let mut urls = Vec::new();
    for (i, item) in stored.chain(given) {
        let Some(parts) = item.get("content").and_then(Value::as_array) else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            if part.get("type").and_then(Value::as_str) != Some("input_image") {
                continue;
            }
            if let Some(url) = part.get("image_url").and_then(Value::as_str).filter(|u| is_remote(u)) {
                let field = match i {
                    Some(i) => format!("input[{i}].content[{j}].image_url"),
                    None => "previous_response_id".to_string(),
                };
                urls.push((field, url.to_string()));
            }
        }
    }
    urls
}

/// The request (after the `history` it continues) as a generation, with the `remote` images
/// fetched for it.
pub fn prepare(
    req: &ResponsesRequest,
    history: &[Value],
    reasoning: ReasoningMode,
    remote: RemoteImages,
) -> Result<Prepared, ApiError> {
    if let Some(name) = req.unknown.keys().find(|k| !ADVISORY.contains(&k.as_str())) {
        let why = match name.as_str() {
            "background" => "background responses are not supported",
            "conversation" => "conversations are not supported; use previous_response_id",
            "prompt" => "prompt templates are not supported",
            "max_tool_calls" => "max_tool_calls is not supported",
            _ => "this server does not implement it",
        };
        return Err(ApiError::invalid(name, format!("unsupported field '{name}': {why}")));
    }
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let truncate = match req.truncation.as_deref() {
        None | Some("disabled") => false,
        Some("auto") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "truncation",
                format!("truncation must be 'auto' or 'disabled', got '{other}'"),
            ))
        }
    };
    let input = input_items(req.input.as_ref())?;
    let (tools, namespaces) = tools(req.tools.as_deref().unwrap_or_default())?;
    let choice = tool_choice(req.tool_choice.as_ref(), &tools)?;
    let mut messages = Vec::new();
    if let Some(instructions) = req.instructions.as_deref().filter(|i| !i.is_empty()) {
        messages.push(ChatMessage::new("system", instructions));
    }
    let mut reader = ItemReader {
        remote,
        ..ItemReader::default()
    };
    for (i, item) in history.iter().enumerate() {
        reader
            .read(item, &mut messages)
            .map_err(|e| prefixed(e, &format!("previous_response_id (stored item {i}) ")))?;
    }
    for (i, item) in input.iter().enumerate() {
        reader.read(item, &mut messages).map_err(|e| at_input(e, i))?;
    }
    let mut chat = ChatPrompt::new(merge_leading_system(messages));
    chat.tools = ToolSet {
        tools,
        choice,
        parallel: req.parallel_tool_calls.unwrap_or(true),
    };
    chat.reasoning = reasoning;
    let summary = read_reasoning(req.reasoning.as_ref(), &mut chat)?;
    let (encrypted, logprobs) = read_include(req.include.as_deref().unwrap_or_default())?;
    if req.top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs must be from 0 to 20"));
    }
    let mut spec = GenerationSpec::new(Prompt::Chat(chat));
    spec.sampling = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        logprobs: logprobs.then(|| req.top_logprobs.unwrap_or(0)),
        ..SamplingParams::default()
    };
    spec.max_tokens = req.max_output_tokens.map_or(MaxTokens::Rest, MaxTokens::Exactly);
    spec.constraint = text_constraint(req.text.as_ref())?;
    Ok(Prepared {
        spec,
        input,
        truncate,
        shape: OutputShape {
            summary,
            encrypted,
            logprobs,
            namespaces,
        },
    })
}

/// `input` as items: a string is one user message.
fn input_items(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![json!({
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}],
        })]),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(ApiError::invalid("input", "input must be a string or a list of items")),
    }
}

fn at_input(e: ApiError, i: usize) -> ApiError {
    match e {
        ApiError::InvalidRequest { message, param } => {
            let param = param.map_or_else(|| format!("input[{i}]"), |p| format!("input[{i}].{p}"));
            ApiError::InvalidRequest {
                message: format!("{param}: {message}"),
                param: Some(param),
            }
        }
        other => other,
    }
}

fn prefixed(e: ApiError, prefix: &str) -> ApiError {
    match e {
        ApiError::InvalidRequest { message, .. } => ApiError::InvalidRequest {
            message: format!("{prefix}{message}"),
            param: Some("previous_response_id".into()),
        },
        other => other,
    }
}

/// The system messages at the head of the conversation (instructions, developer messages) as
/// one: templates that allow a system message allow it first, and some allow only one.
fn merge_leading_system(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages {
        let only_system_so_far = out.len() == 1 && out[0].role == "system";
        if m.role == "system" && only_system_so_far {
            join(&mut out[0].content, &m.content);
        } else {
            out.push(m);
        }
    }
    out
}

/// Reads items in order into template messages: the items of one assistant turn (reasoning,
/// message, calls) become one assistant message; call outputs become `tool` messages.
#[derive(Default)]
struct ItemReader {
    /// The name of each call seen, by call id (a tool message names its function).
    call_names: HashMap<String, String>,
    /// The request's remote images, fetched.
    remote: RemoteImages,
}

/// Which part of an assistant turn an item is; a turn's parts come in this order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Thought,
    Text,
    Calls,
}

impl ItemReader {
    fn read(&mut self, item: &Value, out: &mut Vec<ChatMessage>) -> Result<(), ApiError> {
        let Some(obj) = item.as_object() else {
            return Err(ApiError::InvalidRequest {
                message: "an item must be an object".into(),
                param: None,
            });
        };
        let kind = match obj.get("type") {
            None if obj.contains_key("role") => "message",
            Some(Value::String(kind)) => kind.as_str(),
            _ => return Err(ApiError::invalid("type", "missing item type")),
        };
        let known: &[&str] = match kind {
            "message" => &["type", "role", "content", "id", "status", "phase"],
            "function_call" => &["type", "id", "call_id", "name", "namespace", "arguments", "status"],
            "function_call_output" => &["type", "id", "call_id", "output", "status"],
            "reasoning" => &["type", "id", "summary", "content", "encrypted_content", "status"],
            other => {
                return Err(ApiError::invalid(
                    "type",
                    format!(
                        "item type '{other}' is not supported (message, function_call, function_call_output, reasoning)"
                    ),
                ))
            }
        };
        if let Some(key) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                key,
                format!("unknown field '{key}' of a {kind} item"),
            ));
        }
        let string = |key: &str| -> Result<String, ApiError> {
            obj.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| ApiError::invalid(key, format!("a {kind} item needs '{key}' (a string)")))
        };
        match kind {
            "message" => {
                let role = string("role")?;
                let (role, parts): (&str, &[&str]) = match role.as_str() {
                    "user" => ("user", &["input_text", "input_image"]),
                    "system" | "developer" => ("system", &["input_text"]),
                    "assistant" => ("assistant", &["output_text", "refusal", "input_text"]),
                    other => {
                        return Err(ApiError::invalid(
                            "role",
                            format!("unknown role '{other}' (user, assistant, system or developer)"),
                        ))
                    }
                };
                let (text, images) = content_parts(obj.get("content"), parts, &self.remote)?;
                if role == "assistant" {
                    let turn = self.assistant_turn(out, Part::Text);
                    join(&mut turn.content, &text);
                } else {
                    let mut message = ChatMessage::new(role, text);
                    message.images = images;
                    out.push(message);
                }
            }
            "reasoning" => {
                let thought = thought_of(obj)?;
                let turn = self.assistant_turn(out, Part::Thought);
                let mut joined = turn.reasoning_content.take().unwrap_or_default();
                join(&mut joined, &thought);
                turn.reasoning_content = (!joined.is_empty()).then_some(joined);
            }
            "function_call" => {
                let (id, name, text) = (string("call_id")?, string("name")?, string("arguments")?);
                let arguments: Value = serde_json::from_str(&text)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| ApiError::invalid("arguments", "arguments must be a JSON object, as text"))?;
                self.call_names.insert(id.clone(), name.clone());
                let turn = self.assistant_turn(out, Part::Calls);
                turn.tool_calls.get_or_insert_with(Vec::new).push(json!({
                    "id": id, "type": "function", "function": {"name": name, "arguments": arguments},
                }));
            }
            _ => {
                let id = string("call_id")?;
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other, &["input_text", "output_text"]).map_err(|e| retarget(e, "output"))?,
                };
                let mut message = ChatMessage::new("tool", output);
                message.name = self.call_names.get(&id).cloned();
                message.tool_call_id = Some(id);
                out.push(message);
            }
        }
        Ok(())
    }

    /// The assistant message an item of `part` belongs to: the last message when it is an
    /// assistant turn that has no later part yet (calls may repeat), else a new one.
    fn assistant_turn<'a>(&self, out: &'a mut Vec<ChatMessage>, part: Part) -> &'a mut ChatMessage {
        let fits = out.last().is_some_and(|m| {
            let last_part = if m.tool_calls.is_some() {
                Some(Part::Calls)
            } else if !m.content.is_empty() {
                Some(Part::Text)
            } else if m.reasoning_content.is_some() {
                Some(Part::Thought)
            } else {
                None
            };
            m.role == "assistant" && last_part.is_none_or(|last| last < part || (last == part && part != Part::Thought))
        });
        if !fits {
            out.push(ChatMessage::new("assistant", ""));
        }
        out.last_mut().expect("an assistant message was just ensured")
    }
}

/// A reasoning item's thought: its `reasoning_text` content, else this server's
/// `encrypted_content`, else its summary.
fn thought_of(obj: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let texts = |key: &str, kinds: &[&str]| -> Result<Option<String>, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(parts @ Value::Array(_)) => content_text(Some(parts), kinds)
                .map(|t| (!t.is_empty()).then_some(t))
                .map_err(|e| retarget(e, key)),
            Some(_) => Err(ApiError::invalid(key, format!("{key} must be a list of parts"))),
        }
    };
    if let Some(text) = texts("content", &["reasoning_text", "text"])? {
        return Ok(text);
    }
    if let Some(Value::String(sealed)) = obj.get("encrypted_content") {
        let opened = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix(THOUGHT_TAG).map(str::to_string));
        if let Some(thought) = opened {
            return Ok(thought);
        }
    }
    if !obj.contains_key("summary") {
        return Err(ApiError::invalid("summary", "a reasoning item needs 'summary'"));
    }
    Ok(texts("summary", &["summary_text"])?.unwrap_or_default())
}

/// `encrypted_content` for a thought (see `THOUGHT_TAG`).
pub fn seal_thought(thought: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{THOUGHT_TAG}{thought}"))
}

/// Content as text: a string, or parts of the `allowed` types joined; files and audio are
/// refused by name.
fn content_text(content: Option<&Value>, allowed: &[&str]) -> Result<String, ApiError> {
    // No image part is allowed where only text is read.
    Ok(content_parts(content, allowed, &RemoteImages::default())?.0)
}

/// Content as text and images: a string, or parts of the `allowed` types (`input_image`: a
/// base64 `data:` URL, standing where it comes in the text); files and audio are refused by
/// name.
fn content_parts(
    content: Option<&Value>,
    allowed: &[&str],
    remote: &RemoteImages,
) -> Result<(String, Vec<ChatImage>), ApiError> {
    match content {
        Some(Value::String(s)) => Ok((s.clone(), Vec::new())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            let mut pictures = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                if !allowed.contains(&kind) {
                    return Err(ApiError::invalid(
                        &format!("content[{j}].type"),
                        format!(
                            "content part type '{kind}' is not supported here (expected {}; files and audio are not supported)",
                            allowed.join(" or ")
                        ),
                    ));
                }
                if kind == "input_image" {
                    pictures.push(images::chat_image(input_image(part, j, remote)?, text.len()));
                    continue;
                }
                let known: &[&str] = match kind {
                    "output_text" => &["type", "text", "annotations", "logprobs"],
                    _ => &["type", "text"],
                };
                let key = if kind == "refusal" { "refusal" } else { "text" };
                if let Some(extra) = part
                    .as_object()
                    .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str()) && *k != key))
                {
                    return Err(ApiError::invalid(
                        &format!("content[{j}].{extra}"),
                        format!("unknown field '{extra}' of a {kind} part"),
                    ));
                }
                let Some(piece) = part.get(key).and_then(Value::as_str) else {
                    return Err(ApiError::invalid(
                        &format!("content[{j}].{key}"),
                        format!("a {kind} part needs '{key}' (a string)"),
                    ));
                };
                text.push_str(piece);
            }
            Ok((text, pictures))
        }
        None | Some(Value::Null) => Err(ApiError::invalid("content", "content is required")),
        Some(_) => Err(ApiError::invalid(
            "content",
            "content must be a string or a list of parts",
        )),
    }
}

/// The bytes of an `input_image` part (the `j`th): its `image_url`, a base64 `data:` URL or
/// one of the `remote` images fetched.
fn input_image(part: &Value, j: usize, remote: &RemoteImages) -> Result<Vec<u8>, ApiError> {
    let at = |key: &str| format!("content[{j}].{key}");
    if let Some(extra) = part.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["type", "image_url", "detail", "file_id"].contains(&k.as_str()))
    }) {
        return Err(ApiError::invalid(
            &at(extra),
            format!("unknown field '{extra}' of an input_image part"),
        ));
    }
    if part.get("file_id").is_some_and(|f| !f.is_null()) {
        return Err(ApiError::invalid(
            &at("file_id"),
            "file_id is not supported (this server keeps no files); send the image as a data: URL",
        ));
    }
    match part.get("detail") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if ["auto", "low", "high"].contains(&d.as_str()) => {}
        Some(other) => {
            return Err(ApiError::invalid(
                &at("detail"),
                format!("detail must be auto, low or high, got {other}"),
            ))
        }
    }
    let url = part
        .get("image_url")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(&at("image_url"), "an input_image part needs 'image_url' (a string)"))?;
    remote.bytes(url).map_err(|e| ApiError::invalid(&at("image_url"), e))
}

/// An error about a part renamed under the field it was found in.
fn retarget(e: ApiError, field: &str) -> ApiError {
    match e {
        ApiError::InvalidRequest { message, param } => ApiError::InvalidRequest {
            message,
            param: Some(param.map_or_else(
                || field.to_string(),
                |p| format!("{field}{}", p.strip_prefix("content").unwrap_or(&p)),
            )),
        },
        other => other,
    }
}

/// Appends text after a blank line.
fn join(text: &mut String, more: &str) {
    if !text.is_empty() && !more.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(more);
}

/// `tools` as the template's function tools (`{"type": "function", "function": …}`), the
/// tools of each namespace among them; returns the namespace of each such tool.
fn tools(wire: &[Value]) -> Result<(Vec<Value>, HashMap<String, String>), ApiError> {
    let mut out = Vec::new();
    let mut namespaces = HashMap::new();
    for (i, tool) in wire.iter().enumerate() {
        let at = format!("tools[{i}]");
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => out.push(function_tool(tool, &at)?),
            Some("namespace") => {
                let Some(name) = tool.get("name").and_then(Value::as_str) else {
                    return Err(ApiError::invalid(&format!("{at}.name"), "a namespace needs a name"));
                };
                reject_unknown_keys(tool, &at, &["type", "name", "description", "tools"])?;
                let inner = tool.get("tools").and_then(Value::as_array).ok_or_else(|| {
                    ApiError::invalid(&format!("{at}.tools"), "a namespace needs a list of tools")
                })?;
                for (j, t) in inner.iter().enumerate() {
                    let at = format!("{at}.tools[{j}]");
                    if t.get("type").and_then(Value::as_str) != Some("function") {
                        return Err(ApiError::invalid(
                            &format!("{at}.type"),
                            "a namespace holds function tools only",
                        ));
                    }
                    let f = function_tool(t, &at)?;
                    namespaces.insert(f["function"]["name"].as_str().unwrap_or_default().to_string(), name.to_string());
                    out.push(f);
                }
            }
            Some(kind) if HOSTED_NOT_OFFERED.contains(&kind) => {
                tracing::debug!(tool = kind, "a hosted tool is not offered to the model: this server runs none");
            }
            Some(kind) => {
                return Err(ApiError::invalid(
                    &format!("{at}.type"),
                    format!("tool type '{kind}' is not supported (function and namespace tools; hosted tools other than web_search are refused)"),
                ))
            }
            None => return Err(ApiError::invalid(&format!("{at}.type"), "a tool needs a type")),
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = out
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .find(|n| !seen.insert(*n))
    {
        return Err(ApiError::invalid(
            "tools",
            format!("two tools are named '{dup}' (tool names must be unique, namespaces included)"),
        ));
    }
    Ok((out, namespaces))
}

/// A function tool (`name`, `description`, `parameters`, `strict`) in the template's shape.
fn function_tool(tool: &Value, at: &str) -> Result<Value, ApiError> {
    // `strict` is accepted: a forced call follows the schema, a free one is parsed.
    reject_unknown_keys(
        tool,
        at,
        &["type", "name", "description", "parameters", "strict", "defer_loading"],
    )?;
    let name = tool.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let Some(name) = name else {
        return Err(ApiError::invalid(&format!("{at}.name"), "a function tool needs a name"));
    };
    let parameters = match tool.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{at}.parameters"),
                "parameters must be a JSON schema object",
            ))
        }
    };
    let mut function = json!({"name": name, "parameters": parameters});
    if let Some(description) = tool.get("description").and_then(Value::as_str) {
        function["description"] = Value::String(description.to_string());
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice`: `auto`, `none`, `required`, or `{"type": "function", "name": …}`.
fn tool_choice(choice: Option<&Value>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let choice = match choice {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => tool_choice_word(s)?,
        Some(obj) => match (
            obj.get("type").and_then(Value::as_str),
            obj.get("name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(name)) => {
                if !tools.iter().any(|t| t["function"]["name"] == name) {
                    return Err(ApiError::invalid(
                        "tool_choice.name",
                        format!("tool_choice names '{name}', which is not among the tools"),
                    ));
                }
                ToolChoice::Function(name.to_string())
            }
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": …}",
                ))
            }
        },
    };
    if matches!(choice, ToolChoice::Required) && tools.is_empty() {
        return Err(ApiError::invalid("tool_choice", "tool_choice 'required' needs tools"));
    }
    Ok(choice)
}

/// `reasoning`: `effort` (`none` turns the template's thinking off; others are its
/// `reasoning_effort`) and `summary` (whether the reasoning item carries one). Returns whether
/// a summary was asked for.
fn read_reasoning(reasoning: Option<&Value>, chat: &mut ChatPrompt) -> Result<bool, ApiError> {
    let Some(reasoning) = reasoning.filter(|r| !r.is_null()) else {
        return Ok(false);
    };
    reject_unknown_keys(reasoning, "reasoning", &["effort", "summary", "generate_summary"])?;
    match reasoning.get("effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(e)) if e == "none" => {
            chat.template_kwargs
                .insert("enable_thinking".into(), Value::Bool(false));
        }
        Some(Value::String(e)) if ["minimal", "low", "medium", "high", "xhigh"].contains(&e.as_str()) => {
            chat.template_kwargs
                .insert("reasoning_effort".into(), Value::String(e.clone()));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning.effort",
                format!("reasoning.effort must be none, minimal, low, medium, high or xhigh, got {other}"),
            ))
        }
    }
    let summary = reasoning
        .get("summary")
        .filter(|s| !s.is_null())
        .or_else(|| reasoning.get("generate_summary").filter(|s| !s.is_null()));
    match summary {
        None => Ok(false),
        Some(Value::String(s)) if ["auto", "concise", "detailed"].contains(&s.as_str()) => Ok(true),
        Some(other) => Err(ApiError::invalid(
            "reasoning.summary",
            format!("reasoning.summary must be auto, concise or detailed, got {other}"),
        )),
    }
}

/// `include`: returns (encrypted reasoning, output logprobs). Inclusions about hosted tools
/// have nothing to add here (no such items are made) and are accepted.
fn read_include(include: &[String]) -> Result<(bool, bool), ApiError> {
    const NOTHING_TO_ADD: [&str; 6] = [
        "web_search_call.action.sources",
        "web_search_call.results",
        "file_search_call.results",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "message.input_image.image_url",
    ];
    let (mut encrypted, mut logprobs) = (false, false);
    for (i, item) in include.iter().enumerate() {
        match item.as_str() {
            "reasoning.encrypted_content" => encrypted = true,
            "message.output_text.logprobs" => logprobs = true,
            other if NOTHING_TO_ADD.contains(&other) => {}
            other => {
                return Err(ApiError::invalid(
                    &format!("include[{i}]"),
                    format!("unknown include value '{other}'"),
                ))
            }
        }
    }
    Ok((encrypted, logprobs))
}

/// `text`: its `format` (`text`, `json_object`, or `json_schema` with `schema`) as an output
/// constraint; `verbosity` only at its default, `medium`.
fn text_constraint(text: Option<&Value>) -> Result<Option<crate::text::OutputConstraint>, ApiError> {
    let Some(text) = text.filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    reject_unknown_keys(text, "text", &["format", "verbosity"])?;
    match text.get("verbosity") {
        None | Some(Value::Null) => {}
        Some(v) if v == "medium" => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "text.verbosity",
                format!("text.verbosity {other} is not supported (only medium)"),
            ))
        }
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    reject_unknown_keys(
        format,
        "text.format",
        &["type", "name", "description", "schema", "strict"],
    )?;
    // The same constraint as chat completions' `response_format`, whose schema sits one
    // level down.
    let as_chat = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            json!({"type": "json_schema", "json_schema": {"schema": format.get("schema").cloned().unwrap_or(Value::Null)}})
        }
        Some(kind @ ("text" | "json_object")) => json!({"type": kind}),
        _ => {
            return Err(ApiError::invalid(
                "text.format.type",
                "text.format.type must be text, json_object or json_schema",
            ))
        }
    };
    response_constraint(Some(&as_chat)).map_err(|e| match e {
        ApiError::InvalidRequest { message, .. } => ApiError::invalid("text.format.schema", message),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(items: Value) -> Result<Vec<ChatMessage>, ApiError> {
        let mut out = Vec::new();
        let mut reader = ItemReader::default();
        for (i, item) in items.as_array().unwrap().iter().enumerate() {
            reader.read(item, &mut out).map_err(|e| at_input(e, i))?;
        }
        Ok(merge_leading_system(out))
    }

    #[test]
    fn one_assistant_turn_gathers_its_reasoning_text_and_calls() {
        let messages = read(json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Oslo\"}"},
            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Answer now."}]},
            {"role": "assistant", "content": "Rain at noon."},
        ]))
        .unwrap();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool", "assistant"]);
        assert_eq!(messages[0].content, "Be brief.\n\nUse tools.");
        let turn = &messages[2];
        assert_eq!(turn.reasoning_content.as_deref(), Some("Look it up."));
        assert_eq!(turn.content, "Checking.");
        let calls = turn.tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Oslo"}));
        assert_eq!(calls[1]["id"], "c2");
        assert_eq!(messages[3].name.as_deref(), Some("weather"));
        assert_eq!(messages[4].content, "noon");
        assert_eq!(messages[5].reasoning_content.as_deref(), Some("Answer now."));
        assert_eq!(messages[5].content, "Rain at noon.");
    }

    #[test]
    fn a_sealed_thought_opens_again() {
        let sealed = seal_thought("step one");
        let messages = read(json!([
            {"role": "user", "content": "hi"},
            {"type": "reasoning", "summary": [], "encrypted_content": sealed},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
        ]))
        .unwrap();
        assert_eq!(messages[1].reasoning_content.as_deref(), Some("step one"));
    }

    #[test]
    fn bad_items_are_refused_by_their_path() {
        let cases = [
            (
                json!([{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]),
                "input[0].content[0].type",
            ),
            (
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]),
                "input[0].content[0].image_url",
            ),
            (json!([{"role": "user", "content": "x", "extra": 1}]), "input[0].extra"),
            (
                json!([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]),
                "input[0].arguments",
            ),
            (json!([{"type": "item_reference", "id": "x"}]), "input[0].type"),
            (json!([{"role": "tool", "content": "x"}]), "input[0].role"),
            (json!(["text"]), "input[0]"),
        ];
        for (items, param) in cases {
            match read(items.clone()) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => assert_eq!(p, param, "{items}"),
                other => panic!("{items}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn namespaced_tools_are_offered_by_name_and_hosted_search_is_not() {
        let (tools, namespaces) = tools(&[
            json!({"type": "function", "name": "exec", "parameters": {"type": "object"}, "strict": false}),
            json!({"type": "namespace", "name": "agents", "description": "d", "tools": [
                {"type": "function", "name": "spawn", "description": "Spawn one."},
            ]}),
            json!({"type": "web_search", "external_web_access": false}),
        ])
        .unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["exec", "spawn"]);
        assert_eq!(
            tools[1]["function"]["parameters"],
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(namespaces.get("spawn").map(String::as_str), Some("agents"));
        assert!(super::tools(&[json!({"type": "file_search"})]).is_err());
        assert!(super::tools(&[
            json!({"type": "function", "name": "a"}),
            json!({"type": "namespace", "name": "n", "tools": [{"type": "function", "name": "a"}]}),
        ])
        .is_err());
    }
}
