//! Ollama's error shape: `{"error": "..."}` with the status `ApiError` maps to, fields named
//! the way Ollama names them, and `Retry-After` on 429/503 as on the OpenAI routes.

use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::request::RequestError;
use crate::server::error::{describe, read_json_body, ApiError};

/// An `ApiError` rendered the way Ollama does.
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<RequestError> for OllamaError {
    fn from(e: RequestError) -> Self {
        Self(e.into())
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
            ApiError::ModelNotFound { name, hint } => format!("model '{name}' not found; {hint}"),
            ApiError::Request(e) => describe(e, |f| f.ollama_name()),
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
        let response = (status, Json(OllamaErrorBody { error: self.message() })).into_response();
        self.0.with_retry_after(response)
    }
}

/// Ollama's error shape.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OllamaErrorBody {
    /// What went wrong.
    pub error: String,
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
        read_json_body(req, state).await.map(Self).map_err(OllamaError)
    }
}
