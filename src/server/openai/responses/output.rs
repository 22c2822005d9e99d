//! A generation as a response: output items (`reasoning`, `message`, `function_call`) opened and
//! closed as thought, text and calls arrive, with the Responses API's stream events for each
//! step. Whole and streamed answers are built by this one state machine, so they are equal.

use serde_json::{json, Value};

use super::input::{seal_thought, OutputShape};
use super::types::{CachedTokens, ReasoningTokens, ResponseObject, ResponsesUsage};
use crate::engine::EngineError;
use crate::output::{GeneratedToken, StreamItem};
use crate::request::{FinishReason, Usage};
use crate::server::error::ApiError;
use crate::server::openai::chat::logprobs_json;
use crate::server::openai::new_id;
use crate::text::tools::ToolCall;

/// Which output item is open (always the last one).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Reasoning,
    Message,
}

/// Builds a response from a generation's items, and the stream events that tell it.
pub struct ResponseBuilder {
    response: ResponseObject,
    shape: OutputShape,
    open: Open,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// Generated tokens that produced thought text.
    reasoning_tokens: u32,
    /// Logprob entries of tokens whose text has not been shown yet.
    pending_logprobs: Vec<Value>,
}

impl ResponseBuilder {
    /// A builder for `response` (status `in_progress`, no output yet).
    pub fn new(response: ResponseObject, shape: OutputShape) -> Self {
        Self {
            response,
            shape,
            open: Open::None,
            sequence: 0,
            reasoning_tokens: 0,
            pending_logprobs: Vec::new(),
        }
    }

    /// The response as it stands.
    pub fn response(&self) -> &ResponseObject {
        &self.response
    }

    /// Whether the generation ended (completed, incomplete or failed).
    pub fn finished(&self) -> bool {
        self.response.status != "in_progress"
    }

    /// The events that open a stream: `response.created`, `response.in_progress`.
    pub fn start(&mut self) -> Vec<Value> {
        let snapshot = self.snapshot();
        vec![
            self.event("response.created", json!({"response": snapshot})),
            self.event("response.in_progress", json!({"response": self.snapshot()})),
        ]
    }

    /// Takes one item of the generation; returns the events it makes.
    pub fn on(&mut self, item: StreamItem) -> Vec<Value> {
        let mut events = Vec::new();
        if self.finished() {
            return events;
        }
        match item {
            StreamItem::Delta {
                text,
                reasoning,
                tool_calls,
                tokens,
            } => {
                if !reasoning.is_empty() {
                    if text.is_empty() {
                        self.reasoning_tokens += tokens.len() as u32;
                    }
                    self.thought(&reasoning, &mut events);
                } else if self.shape.logprobs && tool_calls.is_empty() {
                    self.pending_logprobs.extend(entries(&tokens));
                }
                if !text.is_empty() {
                    self.text(&text, &mut events);
                }
                for call in &tool_calls {
                    self.call(call, &mut events);
                }
            }
            StreamItem::Done { reason, usage, .. } => {
                let incomplete = reason == FinishReason::Length;
                self.close(incomplete, &mut events);
                self.response.usage = Some(self.usage(&usage));
                let kind = if incomplete {
                    self.response.status = "incomplete";
                    self.response.incomplete_details = Some(json!({"reason": "max_output_tokens"}));
                    "response.incomplete"
                } else {
                    self.response.status = "completed";
                    "response.completed"
                };
                events.push(self.event(kind, json!({"response": self.snapshot()})));
            }
            StreamItem::Error(e) => events.push(self.fail(e)),
        }
        events
    }

    /// Ends the response as failed; returns its `response.failed` event.
    fn fail(&mut self, e: EngineError) -> Value {
        let body = ApiError::from(e).openai_body().error;
        self.response.status = "failed";
        self.response.error = Some(json!({"code": body.code.unwrap_or("server_error"), "message": body.message}));
        self.event("response.failed", json!({"response": self.snapshot()}))
    }

    fn snapshot(&self) -> Value {
        serde_json::to_value(&self.response).unwrap_or(Value::Null)
    }

    /// An event of `kind` with these fields and the next sequence number.
    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = Value::String(kind.to_string());
        fields["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        fields
    }

    /// Opens a new output item; returns its index.
    fn add(&mut self, item: Value, events: &mut Vec<Value>) -> usize {
        let index = self.response.output.len();
        self.response.output.push(item.clone());
        events.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        index
    }

    /// The open item's index and id.
    fn last(&self) -> (usize, Value) {
        let index = self.response.output.len() - 1;
        (index, self.response.output[index]["id"].clone())
    }

    fn thought(&mut self, delta: &str, events: &mut Vec<Value>) {
        if self.open != Open::Reasoning {
            self.close(false, events);
            let item = json!({"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [], "status": "in_progress"});
            let index = self.add(item, events);
            let id = self.response.output[index]["id"].clone();
            let part = json!({"type": "reasoning_text", "text": ""});
            self.response.output[index]["content"] = json!([part]);
            events.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            ));
            if self.shape.summary {
                let part = json!({"type": "summary_text", "text": ""});
                events.push(self.event(
                    "response.reasoning_summary_part.added",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                ));
            }
            self.open = Open::Reasoning;
        }
        let (index, id) = self.last();
        append(&mut self.response.output[index]["content"][0]["text"], delta);
        events.push(self.event(
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta}),
        ));
        if self.shape.summary {
            events.push(self.event(
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": delta}),
            ));
        }
    }

    fn text(&mut self, delta: &str, events: &mut Vec<Value>) {
        if self.open != Open::Message {
            self.close(false, events);
            let item = json!({"type": "message", "id": new_id("msg_"), "status": "in_progress", "role": "assistant", "content": []});
            let index = self.add(item, events);
            let id = self.response.output[index]["id"].clone();
            let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
            self.response.output[index]["content"] = json!([part]);
            events.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            ));
            self.open = Open::Message;
        }
        let (index, id) = self.last();
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let part = &mut self.response.output[index]["content"][0];
        append(&mut part["text"], delta);
        if let Some(all) = part["logprobs"].as_array_mut() {
            all.extend(logprobs.iter().cloned());
        }
        events.push(self.event(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": logprobs}),
        ));
    }

    fn call(&mut self, call: &ToolCall, events: &mut Vec<Value>) {
        self.close(false, events);
        let mut item = json!({
            "type": "function_call", "id": new_id("fc_"), "call_id": call.id, "name": call.name,
            "arguments": "", "status": "in_progress",
        });
        if let Some(namespace) = self.shape.namespaces.get(&call.name) {
            item["namespace"] = Value::String(namespace.clone());
        }
        let index = self.add(item, events);
        let id = self.response.output[index]["id"].clone();
        events.push(self.event(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": call.arguments}),
        ));
        events.push(self.event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": index, "name": call.name, "arguments": call.arguments}),
        ));
        let item = &mut self.response.output[index];
        item["arguments"] = Value::String(call.arguments.clone());
        item["status"] = "completed".into();
        let item = item.clone();
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
    }

    /// Closes the open item (`incomplete`: the generation was cut short in it).
    fn close(&mut self, incomplete: bool, events: &mut Vec<Value>) {
        let open = std::mem::replace(&mut self.open, Open::None);
        if open == Open::None {
            return;
        }
        let (index, id) = self.last();
        let status = if incomplete { "incomplete" } else { "completed" };
        match open {
            Open::Reasoning => {
                let part = self.response.output[index]["content"][0].clone();
                let text = part["text"].clone();
                events.push(self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
                if self.shape.summary {
                    let part = json!({"type": "summary_text", "text": text});
                    events.push(self.event(
                        "response.reasoning_summary_text.done",
                        json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                    ));
                    events.push(self.event(
                        "response.reasoning_summary_part.done",
                        json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                    ));
                    self.response.output[index]["summary"] = json!([part]);
                }
                if self.shape.encrypted {
                    self.response.output[index]["encrypted_content"] =
                        Value::String(seal_thought(text.as_str().unwrap_or_default()));
                }
            }
            _ => {
                let logprobs = std::mem::take(&mut self.pending_logprobs);
                let part = &mut self.response.output[index]["content"][0];
                if let Some(all) = part["logprobs"].as_array_mut() {
                    all.extend(logprobs);
                }
                let part = part.clone();
                events.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": part["text"], "logprobs": part["logprobs"]}),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
            }
        }
        self.response.output[index]["status"] = status.into();
        let item = self.response.output[index].clone();
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
    }

    fn usage(&self, u: &Usage) -> ResponsesUsage {
        ResponsesUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: CachedTokens {
                cached_tokens: u.cached_tokens,
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: ReasoningTokens {
                reasoning_tokens: self.reasoning_tokens.min(u.completion_tokens),
            },
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// Appends to a JSON string.
fn append(text: &mut Value, more: &str) {
    if let Value::String(s) = text {
        s.push_str(more);
    }
}

/// Logprob entries (`token`, `logprob`, `bytes`, `top_logprobs`) of tokens that carry them.
fn entries(tokens: &[GeneratedToken]) -> Vec<Value> {
    match logprobs_json(tokens)["content"].take() {
        Value::Array(entries) => entries,
        _ => Vec::new(),
    }
}
