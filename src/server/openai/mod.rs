//! OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
//! `/v1/embeddings`, `/v1/models`.

pub mod chat;
pub mod choices;
pub mod completions;
pub mod embeddings;
pub mod models;
pub mod responses;
pub mod tokenize;
pub mod types;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::error::ApiError;
use crate::request::SamplingParams;
use crate::text::OutputConstraint;
use types::{SamplingFields, UnknownFields};

/// Fields the OpenAI API defines as advisory: accepted whatever their value, they change
/// nothing about the generation.
const ADVISORY_FIELDS: [&str; 6] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Maps the wire sampling fields to engine parameters (OpenAI defaults); ranges are checked
/// later, once, by `request::validate`. `logprobs` is the number of alternatives to report.
pub fn sampling_params(f: &SamplingFields, logprobs: Option<u8>) -> Result<SamplingParams, ApiError> {
    let logit_bias = match &f.logit_bias {
        None => Vec::new(),
        Some(map) => map
            .iter()
            .map(|(k, &v)| {
                k.parse::<u32>().map(|id| (id, v)).map_err(|_| {
                    ApiError::invalid("logit_bias", format!("logit_bias keys must be token ids, got '{k}'"))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        // vLLM's convention: 0 and -1 (any value below 1) turn top-k off.
        top_k: f.top_k.filter(|&k| k > 0).map(|k| u32::try_from(k).unwrap_or(u32::MAX)),
        top_p: f.top_p.unwrap_or(1.0),
        min_p: f.min_p.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        repeat_last_n: None,
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        seed: f.seed.as_ref().map(signed_seed).transpose()?,
        logprobs,
        report_tokens: Vec::new(),
        prompt_logprobs: None,
        logit_bias,
    })
}

/// A wire seed as the sampler's: any signed 64-bit integer, each its own RNG stream (two's
/// complement keeps them distinct); anything else is refused by name.
fn signed_seed(n: &serde_json::Number) -> Result<u64, ApiError> {
    n.as_i64()
        .map(|s| s as u64)
        .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer from -2^63 to 2^63-1, got {n}")))
}

/// Refuses, by name, any field this server does not implement, except the advisory ones.
pub fn reject_unknown(unknown: &UnknownFields, prefix: &str) -> Result<(), ApiError> {
    match unknown.keys().find(|k| !ADVISORY_FIELDS.contains(&k.as_str())) {
        Some(name) => Err(ApiError::invalid(
            &format!("{prefix}{name}"),
            format!("unsupported field '{prefix}{name}': this server does not implement it"),
        )),
        None => Ok(()),
    }
}

/// `stream_options` only means something for a streamed response.
pub fn check_stream_options(stream: bool, options: Option<&types::StreamOptions>) -> Result<(), ApiError> {
    if options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(())
}

/// `response_format` as an output constraint: `text` (none), `json_object`, or `json_schema`
/// with its `schema`; anything else is a 400 naming the field.
pub fn response_constraint(format: Option<&serde_json::Value>) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    reject_unknown_keys(format, "response_format", &["type", "json_schema"])?;
    if let Some(spec) = format.get("json_schema") {
        reject_unknown_keys(
            spec,
            "response_format.json_schema",
            &["name", "description", "schema", "strict"],
        )?;
    }
    match format.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputConstraint::JsonObject)),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "json_schema needs a schema object",
                    )
                })?;
            Ok(Some(OutputConstraint::JsonSchema(schema.clone())))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// A 400 naming the first key of the object `value` that is not in `known` (`at` is its path).
pub fn reject_unknown_keys(value: &serde_json::Value, at: &str, known: &[&str]) -> Result<(), ApiError> {
    match value
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        Some(key) => Err(ApiError::invalid(
            &format!("{at}.{key}"),
            format!("unknown field {at}.{key} (expected one of {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A `tool_choice` given as a word: `auto`, `none` or `required` (chat completions and the
/// Responses API spell them alike).
pub fn tool_choice_word(word: &str) -> Result<crate::text::tools::ToolChoice, ApiError> {
    use crate::text::tools::ToolChoice;
    match word {
        "auto" => Ok(ToolChoice::Auto),
        "none" => Ok(ToolChoice::None),
        "required" => Ok(ToolChoice::Required),
        other => Err(ApiError::invalid(
            "tool_choice",
            format!("tool_choice must be auto, none, required or a function, got '{other}'"),
        )),
    }
}

/// Serves a stream of JSON events as SSE ending with `data: [DONE]`.
pub fn sse_response<S>(events: S) -> Response
where
    S: Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
{
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// One SSE `data:` event carrying `value` as JSON.
pub fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
}

/// A random id with the given prefix (`chatcmpl-`, `cmpl-`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
