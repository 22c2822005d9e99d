//! OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

pub mod chat;
pub mod completions;
pub mod models;
pub mod tokenize;
pub mod types;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::error::ApiError;
use crate::engine::{EngineError, ModelInfo, SamplingParams};
use types::SamplingFields;

/// Validates the sampling fields shared by both endpoints; returns the engine parameters and
/// the stop strings. `logprobs` is the number of alternatives to report, if any.
pub fn sampling_params(f: &SamplingFields, logprobs: Option<u8>) -> Result<(SamplingParams, Vec<String>), ApiError> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match f.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let min_p = f.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("min_p must be in [0, 1], got {min_p}"),
        ));
    }
    let penalty = |name: &str, v: Option<f32>| -> Result<f32, ApiError> {
        let v = v.unwrap_or(0.0);
        if (-2.0..=2.0).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                name,
                format!("{name} must be between -2 and 2, got {v}"),
            ))
        }
    };
    let presence_penalty = penalty("presence_penalty", f.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", f.frequency_penalty)?;
    let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("repetition_penalty must be positive, got {repetition_penalty}"),
        ));
    }
    if f.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences are allowed"));
    }
    Ok((
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            repeat_last_n: None,
            presence_penalty,
            frequency_penalty,
            seed: f.seed,
            logprobs,
        },
        stops,
    ))
}

/// Checks `prompt + max_tokens` against the context and the KV pool. Without `max_tokens` the
/// request may use whatever is left of both.
pub fn resolve_max_tokens(prompt_len: usize, max_tokens: Option<u32>, info: &ModelInfo) -> Result<u32, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
    }
    let ctx = info.max_model_len;
    let pool_tokens = info.num_kv_blocks * info.block_size;
    let max = max_tokens.map_or(ctx.min(pool_tokens).saturating_sub(prompt_len).max(1), |m| m as usize);
    if prompt_len + max > ctx {
        return Err(ApiError::ContextLength {
            prompt: prompt_len,
            max,
            total: prompt_len + max,
            ctx,
        });
    }
    let needed = (prompt_len + max).div_ceil(info.block_size);
    if needed > info.num_kv_blocks {
        return Err(ApiError::Engine(EngineError::TooLargeForKvPool {
            needed,
            total: info.num_kv_blocks,
        }));
    }
    Ok(max as u32)
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
