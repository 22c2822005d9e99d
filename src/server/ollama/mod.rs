//! Ollama-compatible routes: `/api/generate`, `/api/chat`, `/api/tags`, `/api/show`,
//! `/api/ps`, `/api/version` and the `/` liveness probe, with Ollama's NDJSON streaming and
//! `{"error": "..."}` bodies.

pub mod chat;
pub mod generate;
pub mod models;
pub mod types;

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde_json::{json, Value};

use super::error::{read_json_body, ApiError};
use super::AppState;
use crate::engine::{SamplingParams, Usage};
use types::Options;

/// Ollama's defaults for absent options (its `api.DefaultOptions`).
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_K: u32 = 40;
const DEFAULT_TOP_P: f32 = 0.9;
const DEFAULT_REPEAT_PENALTY: f32 = 1.1;
const DEFAULT_REPEAT_LAST_N: usize = 64;

/// An `ApiError` rendered the way Ollama does: `{"error": "..."}` with the same status.
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::engine::EngineError> for OllamaError {
    fn from(e: crate::engine::EngineError) -> Self {
        Self(e.into())
    }
}

impl OllamaError {
    /// The message Ollama clients show.
    pub fn message(&self) -> String {
        match &self.0 {
            ApiError::ModelNotFound(name) => format!("model '{name}' not found"),
            other => other.to_string(),
        }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self(ApiError::InvalidRequest {
            message: message.into(),
            param: None,
        })
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        (status, Json(json!({"error": self.message()}))).into_response()
    }
}

/// A JSON body whose parse failures are Ollama-shaped 400s.
pub struct OllamaJson<T>(pub T);

impl<S, T> FromRequest<S> for OllamaJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = OllamaError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json_body(req, state)
            .await
            .map(Self)
            .map_err(OllamaError::bad_request)
    }
}

impl AppState {
    /// Ollama requests must name a model, and it must be this one (with or without a tag).
    pub fn check_ollama_model(&self, model: &str) -> Result<(), OllamaError> {
        if model.is_empty() {
            return Err(OllamaError::bad_request("model is required"));
        }
        self.check_model(Some(model)).map_err(OllamaError)
    }

    /// The name Ollama listings use: `name:latest`.
    pub fn ollama_name(&self) -> String {
        if self.model_name.contains(':') {
            self.model_name.clone()
        } else {
            format!("{}:latest", self.model_name)
        }
    }
}

/// Current time in RFC 3339 with nanoseconds, as Ollama's `created_at`.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// Rejects request features mlxd cannot honour yet, with a clear 400.
pub fn reject_unsupported(format: Option<&Value>, images: Option<&[String]>) -> Result<(), OllamaError> {
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => {
            return Err(OllamaError::bad_request(
                "format (structured JSON output) is not supported by this server yet",
            ))
        }
    }
    if images.is_some_and(|i| !i.is_empty()) {
        return Err(OllamaError::bad_request(
            "images are not supported: this model has no vision input",
        ));
    }
    Ok(())
}

/// A request's sampling as Ollama describes it: engine parameters, stop strings, and the
/// options that bound the generation length.
pub struct OllamaSampling {
    /// Engine sampling parameters.
    pub params: SamplingParams,
    /// Stop strings.
    pub stops: Vec<String>,
    /// The parsed options (`num_predict`, `num_ctx`).
    pub options: Options,
}

/// Parses `options` into engine sampling parameters, stop strings and the length options.
pub fn sampling_from_options(options: Option<&Value>) -> Result<OllamaSampling, OllamaError> {
    let opts: Options = match options {
        None | Some(Value::Null) => Options::default(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| OllamaError::bad_request(format!("invalid options: {e}")))?
        }
    };
    let temperature = opts.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(OllamaError::bad_request("temperature must be a non-negative number"));
    }
    let top_p = opts.top_p.unwrap_or(DEFAULT_TOP_P);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(OllamaError::bad_request("top_p must be in (0, 1]"));
    }
    let min_p = opts.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(OllamaError::bad_request("min_p must be in [0, 1]"));
    }
    let repetition_penalty = opts.repeat_penalty.unwrap_or(DEFAULT_REPEAT_PENALTY);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(OllamaError::bad_request("repeat_penalty must be positive"));
    }
    let repeat_last_n = match opts.repeat_last_n {
        None => Some(DEFAULT_REPEAT_LAST_N),
        Some(-1) => None,
        Some(n) if n >= 0 => Some(n as usize),
        Some(n) => {
            return Err(OllamaError::bad_request(format!(
                "repeat_last_n must be -1 or more, got {n}"
            )))
        }
    };
    let params = SamplingParams {
        temperature,
        top_k: match opts.top_k {
            None => Some(DEFAULT_TOP_K),
            Some(k) if k > 0 => Some(k.min(u32::MAX as i64) as u32),
            Some(_) => None,
        },
        top_p,
        min_p,
        repetition_penalty,
        repeat_last_n,
        presence_penalty: opts.presence_penalty.unwrap_or(0.0),
        frequency_penalty: opts.frequency_penalty.unwrap_or(0.0),
        seed: opts.seed.filter(|s| *s >= 0).map(|s| s as u64),
        logprobs: None,
    };
    Ok(OllamaSampling {
        params,
        stops: opts.stop.clone().unwrap_or_default(),
        options: opts,
    })
}

/// `num_predict` and `num_ctx` → the generation budget for a prompt of `prompt_len` tokens.
pub fn max_tokens_for(opts: &Options, prompt_len: usize, state: &AppState) -> Result<u32, OllamaError> {
    let info = state.engine.info();
    let ctx = match opts.num_ctx {
        Some(n) if n > 0 => (n as usize).min(info.max_model_len),
        _ => info.max_model_len,
    }
    .min(info.num_kv_blocks * info.block_size);
    if prompt_len >= ctx {
        return Err(OllamaError(ApiError::ContextLength {
            prompt: prompt_len,
            max: 1,
            total: prompt_len + 1,
            ctx,
        }));
    }
    let room = ctx - prompt_len;
    let n = match opts.num_predict {
        None | Some(-1) | Some(-2) => room,
        Some(n) if n > 0 => (n as usize).min(room),
        Some(n) => {
            return Err(OllamaError::bad_request(format!(
                "num_predict must be positive, -1 or -2, got {n}"
            )))
        }
    };
    Ok(n as u32)
}

/// The timing and count fields of a final Ollama object (durations in nanoseconds).
pub fn final_stats(usage: &Usage, total: std::time::Duration, load: std::time::Duration) -> Value {
    let ns = |d: std::time::Duration| d.as_nanos() as u64;
    json!({
        "total_duration": ns(total),
        "load_duration": ns(load),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": ns(usage.queue_time + usage.prefill_time),
        "eval_count": usage.completion_tokens,
        "eval_duration": ns(usage.decode_time),
    })
}

/// Merges the fields of `extra` (an object) into `base` (an object).
pub fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
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
pub fn ndjson_line(value: &Value) -> Bytes {
    let mut line = value.to_string();
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
    model: String,
    /// When the handler started (for `total_duration`).
    started: std::time::Instant,
    /// Template + tokenization time (reported as `load_duration`; the model is resident).
    load: std::time::Duration,
    /// Prompt ids, returned in `context` with the generated ids (generate only).
    prompt: Vec<u32>,
    /// Ids that end generation; left out of `context`.
    stop_ids: Vec<u32>,
}

impl Reply {
    /// A reply for a request to `model` that starts now.
    pub fn new(kind: ReplyKind, model: &str, state: &AppState) -> Self {
        Self {
            kind,
            model: model.to_string(),
            started: std::time::Instant::now(),
            load: std::time::Duration::ZERO,
            prompt: Vec::new(),
            stop_ids: state.stop_tokens(false),
        }
    }

    fn object(&self, text: &str, done: bool) -> Value {
        let mut v = json!({"model": self.model, "created_at": now_rfc3339()});
        match self.kind {
            ReplyKind::Generate => v["response"] = json!(text),
            ReplyKind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
        }
        v["done"] = json!(done);
        v
    }

    /// The `done: true` object: reason, counts, durations and (generate) `context`.
    fn last(&self, text: &str, reason: crate::engine::FinishReason, usage: &Usage, generated: &[u32]) -> Value {
        let mut v = self.object(text, true);
        v["done_reason"] = json!(reason.as_str());
        let mut v = merge(v, final_stats(usage, self.started.elapsed(), self.load));
        if self.kind == ReplyKind::Generate {
            let kept = generated.iter().filter(|id| !self.stop_ids.contains(id));
            v["context"] = json!(self.prompt.iter().chain(kept).collect::<Vec<_>>());
        }
        v
    }

    /// The immediate answer to an empty prompt: the model is loaded, nothing is generated.
    pub fn loaded(&self) -> Response {
        let mut v = self.object("", true);
        v["done_reason"] = json!("load");
        Json(v).into_response()
    }

    /// Submits `prompt` with `sampling` and answers with NDJSON lines (`stream`) or one object.
    pub async fn run(
        mut self,
        state: &AppState,
        prompt: Vec<u32>,
        sampling: OllamaSampling,
        stream: bool,
    ) -> Result<Response, OllamaError> {
        self.load = self.started.elapsed();
        let max_tokens = max_tokens_for(&sampling.options, prompt.len(), state)?;
        if self.kind == ReplyKind::Generate {
            self.prompt = prompt.clone();
        }
        let request = crate::engine::GenerateRequest {
            prompt,
            params: sampling.params,
            max_tokens,
            stop_tokens: self.stop_ids.clone(),
        };
        let text = state.generate(request, sampling.stops)?;
        self.respond(text, stream).await
    }

    /// Streams NDJSON lines or returns the folded final object.
    async fn respond(self, text: super::stream::TextStream, stream: bool) -> Result<Response, OllamaError> {
        if !stream {
            let c = super::stream::collect(text).await?;
            let reason = c.reason.unwrap_or(crate::engine::FinishReason::Stop);
            let ids: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
            return Ok(Json(self.last(&c.text, reason, &c.usage, &ids)).into_response());
        }
        let lines = futures::stream::unfold(Some((text, self, Vec::new())), |state| async move {
            let (mut text, reply, mut ids) = state?;
            loop {
                match text.next().await {
                    Some(super::stream::StreamItem::Delta { text: t, tokens }) => {
                        ids.extend(tokens.iter().map(|t| t.id));
                        if t.is_empty() {
                            continue;
                        }
                        let line = ndjson_line(&reply.object(&t, false));
                        return Some((Ok(line), Some((text, reply, ids))));
                    }
                    Some(super::stream::StreamItem::Done { reason, usage }) => {
                        let line = ndjson_line(&reply.last("", reason, &usage, &ids));
                        return Some((Ok(line), None));
                    }
                    Some(super::stream::StreamItem::Error(e)) => {
                        let line = ndjson_line(&json!({"error": OllamaError(e.into()).message()}));
                        return Some((Ok(line), None));
                    }
                    None => return None,
                }
            }
        });
        Ok(ndjson_response(lines))
    }
}
