//! API errors: the only place that maps failures to HTTP status codes and error bodies.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::EngineError;

/// Every failure a handler can report.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or an invalid field value; `param` names the field when known.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending field.
        param: Option<String>,
    },
    /// Prompt plus requested output exceed the model's context.
    #[error("This model's maximum context length is {ctx} tokens. However, you requested {total} tokens ({prompt} in the prompt, {max} for the completion). Please reduce the length of the prompt or max_tokens.")]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        max: usize,
        /// prompt + max.
        total: usize,
        /// The model's context length.
        ctx: usize,
    },
    /// The request names a model this server does not serve.
    #[error("The model '{0}' does not exist")]
    ModelNotFound(String),
    /// No such route.
    #[error("Unknown request URL: {method} {path}")]
    NotFound {
        /// HTTP method.
        method: String,
        /// Path.
        path: String,
    },
    /// Every running and queue slot is taken; retry shortly.
    #[error("the server is at capacity (all running and queue slots are taken); retry shortly")]
    Overloaded,
    /// The engine is not running.
    #[error("the engine is unavailable")]
    Unavailable,
    /// The engine failed this request.
    #[error("{0}")]
    Engine(EngineError),
}

impl ApiError {
    /// An invalid value of the named field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(EngineError::QueueTimeout { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(EngineError::TooLargeForKvPool { .. }) => StatusCode::BAD_REQUEST,
            Self::Engine(EngineError::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        let (kind, code, param) = match self {
            Self::InvalidRequest { param, .. } => ("invalid_request_error", None, param.clone()),
            Self::ContextLength { .. } => (
                "invalid_request_error",
                Some("context_length_exceeded"),
                Some("messages".to_string()),
            ),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_string()),
            ),
            Self::NotFound { .. } => ("invalid_request_error", Some("unknown_url"), None),
            Self::Overloaded => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            Self::Unavailable | Self::Engine(EngineError::Unavailable) => {
                ("server_error", Some("engine_unavailable"), None)
            }
            Self::Engine(EngineError::QueueTimeout { .. }) => ("server_error", Some("queue_timeout"), None),
            Self::Engine(EngineError::TooLargeForKvPool { .. }) => {
                ("invalid_request_error", Some("kv_capacity_exceeded"), None)
            }
            Self::Engine(_) => ("server_error", Some("internal_error"), None),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable => Self::Unavailable,
            other => Self::Engine(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (self.status(), Json(self.openai_body())).into_response();
        if matches!(self, Self::Overloaded | Self::Engine(EngineError::QueueTimeout { .. })) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Reads a request body as JSON whatever its `Content-Type` (curl's `-d`, Ollama clients and
/// many scripts send none or a form type); the error text says what is wrong and where.
pub async fn read_json_body<T, S>(req: Request, state: &S) -> Result<T, String>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    let bytes = Bytes::from_request(req, state).await.map_err(|e| e.body_text())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// A JSON body whose parse failures become `ApiError::InvalidRequest` in OpenAI shape.
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json_body(req, state)
            .await
            .map(Self)
            .map_err(|message| ApiError::InvalidRequest { message, param: None })
    }
}
