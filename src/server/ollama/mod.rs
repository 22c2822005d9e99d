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

use serde_json::Value;

use super::registry::ModelLease;
use super::AppState;
use crate::request::KeepAlive;

impl AppState {
    /// The model an Ollama request names (it must name one), loaded if need be and kept for
    /// the request's `keep_alive` (the server's default when absent).
    pub async fn ollama_model(&self, name: &str, keep_alive: Option<&Value>) -> Result<ModelLease, OllamaError> {
        if name.is_empty() {
            return Err(OllamaError::bad_request("model is required"));
        }
        let keep_alive = keep_alive
            .filter(|v| !v.is_null())
            .map(KeepAlive::parse)
            .transpose()
            .map_err(|e| OllamaError::bad_request(format!("keep_alive {e}")))?;
        let model = self.model(Some(name)).await.map_err(OllamaError)?;
        Ok(match keep_alive {
            Some(k) => model.keeping(k),
            None => model,
        })
    }
}

/// The name Ollama listings use: `name:tag`, `:latest` when the name has no tag.
pub fn ollama_name(name: &str) -> String {
    if name.rsplit('/').next().is_some_and(|last| last.contains(':')) {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Whether a request's `keep_alive` asks to unload at once (`0`).
pub fn unloads_now(keep_alive: Option<&Value>) -> bool {
    keep_alive.is_some_and(|v| KeepAlive::parse(v) == Ok(KeepAlive::For(std::time::Duration::ZERO)))
}

/// Current time in RFC 3339 with nanoseconds, as Ollama's `created_at`.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}
