//! Ollama's replies: NDJSON lines while streaming, one folded object otherwise, and the final
//! object's counts and durations (nanoseconds), for `/api/generate` and `/api/chat` alike.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::Serialize;

use super::error::OllamaErrorBody;
use super::types::{ChatResponse, FinalStats, FunctionCall, GenerateResponse, MessageOut, ToolCall};
use super::{now_rfc3339, OllamaError};
use crate::output::{collect, StreamItem, TextStream};
use crate::request::{FinishReason, Usage, ValidatedRequest};
use crate::server::registry::ModelLease;
use crate::server::AppState;
use crate::text::tools;

/// New text of a reply: answer, thought, and calls completed.
#[derive(Clone, Debug, Default)]
pub struct Piece {
    /// Answer text.
    pub content: String,
    /// Thought text.
    pub thinking: String,
    /// Calls.
    pub tool_calls: Vec<tools::ToolCall>,
    /// Calls made in earlier pieces (the index of this piece's first call).
    pub calls_before: u32,
}

impl Piece {
    fn is_empty(&self) -> bool {
        self.content.is_empty() && self.thinking.is_empty() && self.tool_calls.is_empty()
    }
}

/// The timing and count fields of a final Ollama object (durations in nanoseconds).
pub fn final_stats(usage: &Usage, total: std::time::Duration, load: std::time::Duration) -> FinalStats {
    let ns = |d: std::time::Duration| Some(d.as_nanos() as u64);
    FinalStats {
        total_duration: ns(total),
        load_duration: ns(load),
        prompt_eval_count: Some(usage.prompt_tokens),
        prompt_eval_duration: ns(usage.queue_time + usage.prefill_time),
        eval_count: Some(usage.completion_tokens),
        eval_duration: ns(usage.decode_time),
    }
}

/// One object of either endpoint.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum ReplyObject {
    /// `/api/generate`.
    Generate(GenerateResponse),
    /// `/api/chat`.
    Chat(ChatResponse),
}

/// An `application/x-ndjson` response: one JSON object per line.
pub fn ndjson_response<S>(lines: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// One NDJSON line.
pub fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    line.push('\n');
    Bytes::from(line)
}

/// Which endpoint's object shape a reply uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// `/api/generate`: text in `response`, final object carries `context`.
    Generate,
    /// `/api/chat`: text in `message.content`.
    Chat,
}

/// Everything needed to shape one request's NDJSON lines or final object.
pub struct Reply {
    /// Endpoint shape.
    kind: ReplyKind,
    /// Model name echoed in every object.
    name: String,
    /// When the handler started (for `total_duration`).
    started: std::time::Instant,
    /// Template + tokenization time (reported as `load_duration`; the model is resident).
    load: std::time::Duration,
    /// Prompt ids, returned in `context` with the generated ids (generate only).
    prompt: Vec<u32>,
    /// Ids that end generation; left out of `context`.
    stop_ids: Vec<u32>,
    /// The model the reply comes from.
    model: ModelLease,
}

impl Reply {
    /// A reply from `model` (asked for as `name`) that starts now.
    pub fn new(kind: ReplyKind, name: &str, model: ModelLease) -> Self {
        Self {
            kind,
            name: name.to_string(),
            started: std::time::Instant::now(),
            load: std::time::Duration::ZERO,
            prompt: Vec::new(),
            stop_ids: model.limits.eos_token_ids.clone(),
            model,
        }
    }

    fn object(&self, piece: &Piece, end: Option<(&str, FinalStats)>, context: Option<Vec<u32>>) -> ReplyObject {
        let created_at = now_rfc3339();
        let done = end.is_some();
        let (done_reason, stats) = match end {
            Some((reason, stats)) => (Some(reason.to_string()), stats),
            None => (None, FinalStats::default()),
        };
        let thinking = (!piece.thinking.is_empty()).then(|| piece.thinking.clone());
        match self.kind {
            ReplyKind::Generate => ReplyObject::Generate(GenerateResponse {
                model: self.name.clone(),
                created_at,
                response: piece.content.clone(),
                thinking,
                done,
                done_reason,
                context,
                stats,
            }),
            ReplyKind::Chat => ReplyObject::Chat(ChatResponse {
                model: self.name.clone(),
                created_at,
                message: MessageOut {
                    role: "assistant",
                    content: piece.content.clone(),
                    thinking,
                    tool_calls: (!piece.tool_calls.is_empty()).then(|| ollama_calls(piece)),
                },
                done,
                done_reason,
                stats,
            }),
        }
    }

    /// The `done: true` object: reason, counts, durations and (generate) `context`.
    fn last(&self, piece: &Piece, reason: FinishReason, usage: &Usage, generated: &[u32]) -> ReplyObject {
        let stats = final_stats(usage, self.started.elapsed(), self.load);
        let context = (self.kind == ReplyKind::Generate).then(|| {
            let kept = generated.iter().filter(|id| !self.stop_ids.contains(id));
            self.prompt.iter().chain(kept).copied().collect()
        });
        self.object(piece, Some((reason.ollama_str(), stats)), context)
    }

    /// The immediate answer to an empty prompt: the model is loaded, nothing is generated;
    /// with `keep_alive: 0` it is unloaded instead (once idle).
    pub fn loaded(self, state: &AppState, keep_alive: Option<&serde_json::Value>) -> Response {
        let unload = super::unloads_now(keep_alive);
        let reason = if unload { "unload" } else { "load" };
        let body = Json(self.object(&Piece::default(), Some((reason, FinalStats::default())), None));
        if unload {
            let name = self.model.name().to_string();
            drop(self);
            state.models.unload_when_idle(&name);
        }
        body.into_response()
    }

    /// Submits a validated request and answers with NDJSON lines (`stream`) or one object.
    pub async fn run_validated(
        mut self,
        state: &AppState,
        request: ValidatedRequest,
        stream: bool,
    ) -> Result<Response, OllamaError> {
        self.load = self.started.elapsed();
        if self.kind == ReplyKind::Generate {
            self.prompt = request.prompt().to_vec();
        }
        let mut text = state.generate(&self.model, request)?;
        // A queue timeout before the first byte is an HTTP status, not a failed stream.
        text.wait_scheduled().await?;
        self.respond(text, stream).await
    }

    /// Streams NDJSON lines or returns the folded final object.
    async fn respond(self, text: TextStream, stream: bool) -> Result<Response, OllamaError> {
        if !stream {
            let c = collect(text).await?;
            let reason = c.reason.unwrap_or(FinishReason::Stop);
            let ids: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
            let piece = Piece {
                content: c.text,
                thinking: c.reasoning,
                tool_calls: c.tool_calls,
                calls_before: 0,
            };
            return Ok(Json(self.last(&piece, reason, &c.usage, &ids)).into_response());
        }
        let lines = futures::stream::unfold(Some((text, self, Vec::new(), 0u32)), |state| async move {
            let (mut text, reply, mut ids, mut calls) = state?;
            loop {
                match text.next().await {
                    Some(StreamItem::Delta {
                        text: content,
                        reasoning,
                        tool_calls,
                        tokens,
                    }) => {
                        ids.extend(tokens.iter().map(|t| t.id));
                        let piece = Piece {
                            content,
                            thinking: reasoning,
                            calls_before: calls,
                            tool_calls,
                        };
                        if piece.is_empty() {
                            continue;
                        }
                        calls += piece.tool_calls.len() as u32;
                        let line = ndjson_line(&reply.object(&piece, None, None));
                        return Some((Ok(line), Some((text, reply, ids, calls))));
                    }
                    Some(StreamItem::Done { reason, usage, .. }) => {
                        let line = ndjson_line(&reply.last(&Piece::default(), reason, &usage, &ids));
                        return Some((Ok(line), None));
                    }
                    Some(StreamItem::Error(e)) => {
                        let line = ndjson_line(&OllamaErrorBody {
                            error: OllamaError(e.into()).message(),
                        });
                        return Some((Ok(line), None));
                    }
                    None => return None,
                }
            }
        });
        Ok(ndjson_response(lines))
    }
}

/// Calls in Ollama's shape: arguments as an object, with their position.
fn ollama_calls(piece: &Piece) -> Vec<ToolCall> {
    piece
        .tool_calls
        .iter()
        .zip(piece.calls_before..)
        .map(|(c, index)| ToolCall {
            function: FunctionCall {
                index: Some(index),
                name: c.name.clone(),
                arguments: serde_json::from_str(&c.arguments).unwrap_or_default(),
            },
        })
        .collect()
}
