//! API errors: the only place that maps failures to HTTP status codes and error bodies.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::registry::ModelError;
use crate::catalog::NotFound;
use crate::engine::EngineError;
use crate::request::RequestError;

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
    /// The one validation step refused the request.
    #[error("{}", describe(.0, |f| f.openai_name()))]
    Request(RequestError),
    /// The request names a model this server does not serve; `hint` names what it does serve
    /// (the close matches, or every model when none is close).
    #[error("The model '{name}' does not exist; {hint}")]
    ModelNotFound {
        /// The name asked for.
        name: String,
        /// What to ask for instead.
        hint: String,
    },
    /// No such route.
    #[error("Unknown request URL: {method} {path}")]
    NotFound {
        /// HTTP method.
        method: String,
        /// Path.
        path: String,
    },
    /// A known route called with another method.
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed {
        /// HTTP method.
        method: String,
        /// Path.
        path: String,
    },
    /// No stored response has this id (never stored, expired, evicted or deleted); `param`
    /// names the request field that named it.
    #[error("{message}")]
    ResponseNotFound {
        /// Which id, and why it is missing.
        message: String,
        /// `previous_response_id`, or None for a path's id.
        param: Option<String>,
    },
    /// The request body is larger than the server accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// No valid API key was presented.
    #[error("invalid or missing API key: send it as 'Authorization: Bearer KEY'")]
    Unauthorized,
    /// The server is shutting down and takes no new generations.
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// Every running and queue slot is taken; retry shortly.
    #[error("the server is at capacity (all running and queue slots are taken); retry shortly")]
    Overloaded,
    /// The engine is not running.
    #[error("the engine is unavailable")]
    Unavailable,
    /// The engine failed this request.
    #[error("{0}")]
    Engine(EngineError),
    /// The named model exists but could not be loaded.
    #[error("{0}")]
    ModelLoadFailed(String),
    /// The named model cannot be loaded now: every loaded model is busy.
    #[error("{0}")]
    ModelUnavailable(String),
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::NotFound(miss) => Self::model_not_found(&miss),
            e @ ModelError::Load { .. } => Self::ModelLoadFailed(e.to_string()),
            e @ ModelError::NoRoom(_) => Self::ModelUnavailable(e.to_string()),
        }
    }
}

impl ApiError {
    /// A 404 for a name no model has, naming the close matches (`mlxd list` shows them all).
    pub fn model_not_found(miss: &NotFound) -> Self {
        let hint = match (miss.close.as_slice(), miss.known.len()) {
            ([], 0) => "this server has no models".to_string(),
            ([], n) if n < 10 => format!("this server serves: {}", miss.known.join(", ")),
            ([], _) => format!(
                "this server serves {} and more (GET /v1/models lists them all)",
                miss.known.join(", ")
            ),
            (close, _) => format!("did you mean {}?", close.join(" or ")),
        };
        Self::ModelNotFound {
            name: miss.name.clone(),
            hint,
        }
    }

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
            Self::InvalidRequest { .. } | Self::Request(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. } | Self::NotFound { .. } | Self::ResponseNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(EngineError::QueueTimeout { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(EngineError::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ModelLoadFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ModelUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Adds `Retry-After` to the answer when retrying later can succeed (429, 503).
    pub fn with_retry_after(&self, mut response: Response) -> Response {
        if matches!(
            self.status(),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> OpenAiErrorBody {
        let (kind, code, param) = match self {
            Self::InvalidRequest { param, .. } => ("invalid_request_error", None, param.clone()),
            Self::Request(e) => {
                let code = match e {
                    RequestError::Invalid { .. } => None,
                    RequestError::ContextLength { .. } => Some("context_length_exceeded"),
                    RequestError::TooLargeForKvPool { .. } => Some("kv_capacity_exceeded"),
                };
                (
                    "invalid_request_error",
                    code,
                    e.field().map(|f| f.openai_name().to_string()),
                )
            }
            Self::ModelNotFound { .. } => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_string()),
            ),
            Self::NotFound { .. } => ("invalid_request_error", Some("unknown_url"), None),
            Self::ResponseNotFound { param: Some(p), .. } => (
                "invalid_request_error",
                Some("previous_response_not_found"),
                Some(p.clone()),
            ),
            Self::ResponseNotFound { param: None, .. } => ("invalid_request_error", Some("response_not_found"), None),
            Self::MethodNotAllowed { .. } => ("invalid_request_error", Some("method_not_allowed"), None),
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key"), None),
            Self::PayloadTooLarge(_) => ("invalid_request_error", Some("payload_too_large"), None),
            Self::ShuttingDown => ("server_error", Some("shutting_down"), None),
            Self::Overloaded => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            Self::Unavailable | Self::Engine(EngineError::Unavailable) => {
                ("server_error", Some("engine_unavailable"), None)
            }
            Self::Engine(EngineError::QueueTimeout { .. }) => ("server_error", Some("queue_timeout"), None),
            Self::Engine(_) => ("server_error", Some("internal_error"), None),
            Self::ModelLoadFailed(_) => ("server_error", Some("model_load_failed"), Some("model".to_string())),
            Self::ModelUnavailable(_) => ("server_error", Some("model_unavailable"), Some("model".to_string())),
        };
        OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

/// OpenAI's error shape.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiErrorDetail,
}

/// The inside of an OpenAI error.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The offending request field, when there is one.
    pub param: Option<String>,
    /// Machine-readable code (`context_length_exceeded`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
}

/// A validation error as one sentence, with the field named as `name` gives it.
pub fn describe(e: &RequestError, name: impl Fn(crate::request::Field) -> &'static str) -> String {
    match e {
        RequestError::Invalid { field, message } => format!("{} {message}", name(*field)),
        other => other.to_string(),
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        Self::Request(e)
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
        let response = (self.status(), Json(self.openai_body())).into_response();
        self.with_retry_after(response)
    }
}

/// Reads a request body as JSON whatever its `Content-Type` (curl's `-d`, Ollama clients and
/// many scripts send none or a form type); the error says what is wrong and where (413 for a
/// body over the limit, 400 otherwise).
pub async fn read_json_body<T, S>(req: Request, state: &S) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", e.body_text()))
        } else {
            ApiError::InvalidRequest {
                message: e.body_text(),
                param: None,
            }
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidRequest {
        message: format!("invalid JSON body: {e}"),
        param: None,
    })
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
        read_json_body(req, state).await.map(Self)
    }
}
