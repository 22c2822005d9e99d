//! Ollama-compatible routes: `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings`,
//! `/api/tags`, `/api/show`, `/api/ps`, `/api/version` and the `/` liveness probe, with
//! Ollama's NDJSON streaming and `{"error": "..."}` bodies; `/api/pull`, `push`, `create`, `copy` and `delete` answer what
//! mlxd does instead. Each job has its file: wire types, `options` conversion, errors,
//! replies, and one file per route group.

pub mod chat;
pub mod embed;
pub mod error;
pub mod generate;
pub mod models;
pub mod options;
pub mod reply;
pub mod types;

pub use error::{OllamaError, OllamaJson};

use super::AppState;

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
