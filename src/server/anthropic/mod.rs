//! Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, for Claude
//! Code and the `anthropic` SDKs. The handlers convert the wire ⇄ the API-neutral types and
//! ride the same validation, engine, templates, tool and reasoning parsers and prefix cache as
//! chat completions; errors take Anthropic's shape (`{"type": "error", "error": {…}}`), in a
//! stream too.

pub mod messages;
pub mod types;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::EngineError;
use crate::request::{Field, RequestError};
use crate::server::error::{describe, read_json_body, ApiError};
use types::{AnthropicErrorBody, AnthropicErrorDetail};

/// An `ApiError` rendered the way Anthropic's API does.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<RequestError> for AnthropicError {
    fn from(e: RequestError) -> Self {
        Self(e.into())
    }
}

impl From<EngineError> for AnthropicError {
    fn from(e: EngineError) -> Self {
        Self(e.into())
    }
}

impl AnthropicError {
    /// A 400 naming the field at `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self(ApiError::invalid(param, message))
    }

    /// Anthropic's body for this error.
    pub fn body(&self) -> AnthropicErrorBody {
        let kind = match self.0.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        };
        let message = match &self.0 {
            ApiError::Request(e @ RequestError::ContextLength { prompt, max, ctx, .. }) => {
                context_message(*prompt, *max, *ctx).unwrap_or_else(|| describe(e, anthropic_name))
            }
            ApiError::Request(e) => describe(e, anthropic_name),
            ApiError::InvalidRequest {
                message,
                param: Some(param),
            } if !message.contains(param.as_str()) => format!("{param}: {message}"),
            other => other.to_string(),
        };
        AnthropicErrorBody {
            kind: "error",
            error: AnthropicErrorDetail { kind, message },
        }
    }
}

/// Anthropic's own words for a request the context cannot hold, which agents read to compact
/// a conversation (Claude Code parses the counts) and LiteLLM to raise its context-window
/// error; None when it is the KV pool, not the context, that is short.
fn context_message(prompt: usize, max: usize, ctx: usize) -> Option<String> {
    if prompt >= ctx {
        Some(format!(
            "prompt is too long: {prompt} tokens > {} maximum",
            ctx.saturating_sub(1)
        ))
    } else if prompt + max > ctx {
        Some(format!(
            "input length and `max_tokens` exceed context limit: {prompt} + {max} > {ctx}, decrease input length or `max_tokens` and try again"
        ))
    } else {
        None
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        let response = (status, Json(self.body())).into_response();
        self.0.with_retry_after(response)
    }
}

/// A request field as Anthropic's API names it.
pub fn anthropic_name(field: Field) -> &'static str {
    match field {
        Field::Stop => "stop_sequences",
        Field::MaxTokens | Field::ContextWindow => "max_tokens",
        Field::Prompt | Field::Context | Field::Input => "messages",
        other => other.openai_name(),
    }
}

/// A JSON body whose parse failures are Anthropic-shaped 400s.
pub struct AnthropicJson<T>(pub T);

impl<S, T> FromRequest<S> for AnthropicJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AnthropicError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json_body(req, state).await.map(Self).map_err(AnthropicError)
    }
}
