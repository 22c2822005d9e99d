//! HTTP edge: axum routes for the OpenAI API plus health. Handlers parse and validate, render
//! the chat template, tokenize, submit to the engine and encode its events; nothing here
//! touches a tensor.

pub mod error;
pub mod ollama;
pub mod openai;
pub mod stream;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::CorsLayer;
use tower_http::trace::TraceLayer;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::{EngineHandle, GenerateRequest};
use crate::text::TextCodec;
use error::ApiError;
use stream::TextStream;

/// Shared, read-only state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// Tokenizer and chat template of the served model.
    pub codec: Arc<TextCodec>,
    /// Name clients use for the model.
    pub model_name: String,
    /// Server start (Unix seconds), reported as the model's creation time.
    pub created: i64,
    /// `system_fingerprint` of responses: identifies the backend and dtype.
    pub fingerprint: String,
    /// One permit per request running or queued; none left means 429.
    admission: Arc<Semaphore>,
}

impl AppState {
    /// State for a loaded engine and codec serving `model_name`, admitting at most
    /// `admission_limit` requests at once (running plus queued).
    pub fn new(engine: EngineHandle, codec: Arc<TextCodec>, model_name: String, admission_limit: usize) -> Self {
        let fingerprint = format!("mlxd-{}-{:?}", env!("CARGO_PKG_VERSION"), engine.info().model.dtype).to_lowercase();
        Self {
            engine,
            codec,
            model_name,
            created: openai::unix_now(),
            fingerprint,
            admission: Arc::new(Semaphore::new(admission_limit)),
        }
    }

    /// Takes an admission slot for the lifetime of a generation, or fails at once when the
    /// server already holds as many requests as it may run and queue.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)
    }

    /// Admits, submits and wraps a request: the one path from a handler to a `TextStream`.
    pub fn generate(&self, request: GenerateRequest, stop_strings: Vec<String>) -> Result<TextStream, ApiError> {
        let permit = self.admit()?;
        let prompt = request.prompt.clone();
        let generation = self.engine.submit(request)?;
        Ok(TextStream::new(generation, self.codec.clone(), &prompt, stop_strings).holding(permit))
    }

    /// Accepts the served name, with or without an Ollama-style `:latest` tag; an absent or
    /// empty name means the served model.
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            None | Some("") => Ok(()),
            Some(name) if name == self.model_name || name.strip_suffix(":latest") == Some(&self.model_name) => Ok(()),
            Some(name) => Err(ApiError::ModelNotFound(name.to_string())),
        }
    }

    /// Token ids that end generation: the model's EOS ids unless `ignore_eos`.
    pub fn stop_tokens(&self, ignore_eos: bool) -> Vec<u32> {
        if ignore_eos {
            Vec::new()
        } else {
            self.codec.eos_ids().to_vec()
        }
    }
}

/// All routes with tracing and permissive CORS (browser UIs call a local server directly).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat::chat_completions))
        .route("/v1/completions", post(openai::completions::completions))
        .route("/v1/models", get(openai::models::list_models))
        .route("/tokenize", post(openai::tokenize::tokenize))
        .route("/detokenize", post(openai::tokenize::detokenize))
        .route("/api/generate", post(ollama::generate::generate))
        .route("/api/chat", post(ollama::chat::chat))
        .route("/api/tags", get(ollama::models::tags))
        .route("/api/show", post(ollama::models::show))
        .route("/api/ps", get(ollama::models::ps))
        .route("/api/version", get(ollama::models::version))
        .route("/", get(ollama::models::root).head(ollama::models::root))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(TraceLayer::new_for_http())
        .layer(CorsLayer::permissive())
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves. Streaming writes many small events,
/// so Nagle's algorithm is turned off: with it, delayed ACKs stall each event by ~40 ms.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// 200 while the engine thread runs, 503 otherwise.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.engine.is_healthy() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine unavailable"})),
        )
    }
}

/// Prometheus text exposition of the engine's metrics.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.engine.metrics().render(state.engine.stats());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}

/// Unknown routes: Ollama's error shape under `/api/`, OpenAI's elsewhere.
async fn not_found(method: Method, uri: Uri) -> axum::response::Response {
    let err = ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    if uri.path().starts_with("/api/") {
        ollama::OllamaError(err).into_response()
    } else {
        err.into_response()
    }
}
