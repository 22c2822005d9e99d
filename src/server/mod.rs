//! HTTP edge: axum routes for the OpenAI, Ollama and Anthropic APIs plus health. Handlers parse and validate, render
//! the chat template, tokenize, submit to the engine and encode its events; nothing here
//! touches a tensor.

pub mod access_log;
pub mod anthropic;
pub mod auth;
pub mod error;
pub mod fit;
pub mod image_urls;
pub mod images;
pub mod kv_pin;
pub mod listen;
pub mod ollama;
pub mod openai;
pub mod openapi;
pub mod registry;
pub mod rerank;
pub mod ui;

pub use listen::{serve, ConnectionTimeouts};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Extension;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::catalog::{CatalogEntry, Origin};
use crate::engine::EngineHandle;
use crate::output::{Embedding, TextStream};
use crate::request::{EmbeddingSpec, GenerationSpec, RequestError, ValidatedRequest};
use crate::text::{ReasoningMode, TextCodec};
use error::ApiError;
use registry::{ModelLease, ModelRegistry, Served};

/// Shared, read-only state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The models that can be served and those loaded.
    pub models: Arc<ModelRegistry>,
    /// Server start (Unix seconds), reported as the models' creation time.
    pub created: i64,
    /// What happens to a thinking model's thoughts unless a request says otherwise.
    pub reasoning: ReasoningMode,
    /// Serve the chat page at `/` to browsers (`--no-ui` turns it off).
    pub ui: bool,
    /// Keep OpenAI's context rules: a prompt plus `max_tokens` beyond the context is a 400
    /// (instead of a reply that ends at the context's end), and so is a chat completion's
    /// conversation that does not fit (instead of one fitted as Ollama fits it).
    pub strict_context: bool,
    /// Responses kept for the Responses API's `previous_response_id` and `GET`.
    pub responses: Arc<openai::responses::store::ResponseStore>,
    /// Fetches requests' `http(s)` image URLs (`--allow-image-urls`; by default it refuses them).
    pub image_urls: image_urls::ImageFetcher,
    /// One permit per request running or queued; none left means 429.
    admission: Arc<Semaphore>,
    /// Set once shutdown began: new generations get 503.
    draining: Arc<AtomicBool>,
}

/// HTTP settings of the router.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest pause while a request body arrives; a stalled body fails the request.
    pub body_read_timeout: std::time::Duration,
    /// API keys and CORS origins.
    pub access: auth::AccessOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            body_read_timeout: std::time::Duration::from_secs(30),
            access: auth::AccessOptions::default(),
        }
    }
}

impl AppState {
    /// State for one loaded engine and codec serving `model_name` (it never unloads),
    /// admitting at most `admission_limit` requests at once (running plus queued).
    pub fn new(engine: EngineHandle, codec: Arc<TextCodec>, model_name: String, admission_limit: usize) -> Self {
        let entry = CatalogEntry {
            name: model_name,
            path: std::path::PathBuf::new(),
            origin: Origin::Path,
            ollama: None,
            mmproj: None,
        };
        let served = Served::new(entry, engine, codec, None);
        Self::with_models(Arc::new(ModelRegistry::pinned(served)), admission_limit)
    }

    /// State over a model registry.
    pub fn with_models(models: Arc<ModelRegistry>, admission_limit: usize) -> Self {
        Self {
            models,
            created: openai::unix_now(),
            reasoning: ReasoningMode::default(),
            ui: true,
            strict_context: false,
            responses: Arc::new(openai::responses::store::ResponseStore::new(Default::default())),
            image_urls: image_urls::ImageFetcher::default(),
            admission: Arc::new(Semaphore::new(admission_limit)),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The model a request names (absent or empty: the default one), loaded if need be.
    pub async fn model(&self, name: Option<&str>) -> Result<ModelLease, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::ShuttingDown);
        }
        Ok(self.models.get(name).await?)
    }

    /// Takes an admission slot for the lifetime of a generation, or fails at once when the
    /// server already holds as many requests as it may run and queue.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::ShuttingDown);
        }
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)
    }

    /// Refuses every new generation from now on (graceful shutdown); running ones go on.
    pub fn stop_admitting(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The one validation step, against `model`, on a blocking thread (templating and
    /// tokenizing a long conversation takes milliseconds). Unless `strict_context`, an
    /// exact budget (OpenAI's `max_tokens`) is a cap: a reply that would run past the context
    /// ends there with `length`, as Ollama and llama-server end theirs.
    pub async fn validate(
        &self,
        model: &ModelLease,
        mut spec: GenerationSpec,
    ) -> Result<ValidatedRequest, RequestError> {
        if !self.strict_context {
            spec.max_tokens = spec.max_tokens.as_cap();
        }
        let codec = model.codec.clone();
        let limits = model.limits.clone();
        match tokio::task::spawn_blocking(move || crate::request::validate(spec, &codec, &limits)).await {
            Ok(result) => result,
            Err(e) => Err(RequestError::Invalid {
                field: crate::request::Field::Prompt,
                message: format!("could not be prepared: {e}"),
            }),
        }
    }

    /// Validates the inputs of one embedding request (the embedding twin of `validate`).
    pub async fn validate_embeddings(
        &self,
        model: &ModelLease,
        specs: Vec<EmbeddingSpec>,
    ) -> Result<Vec<ValidatedRequest>, RequestError> {
        let codec = model.codec.clone();
        let limits = model.limits.clone();
        let check = move || {
            specs
                .into_iter()
                .map(|spec| crate::request::validate_embedding(spec, &codec, &limits))
                .collect()
        };
        match tokio::task::spawn_blocking(check).await {
            Ok(result) => result,
            Err(e) => Err(RequestError::Invalid {
                field: crate::request::Field::Input,
                message: format!("could not be prepared: {e}"),
            }),
        }
    }

    /// Admits every input of an embedding request at once (or none: 429) and waits for all
    /// their vectors; the engine batches them together.
    pub async fn embed(&self, model: &ModelLease, requests: Vec<ValidatedRequest>) -> Result<Vec<Embedding>, ApiError> {
        let permits = requests.iter().map(|_| self.admit()).collect::<Result<Vec<_>, _>>()?;
        let jobs = requests
            .into_iter()
            .zip(permits)
            .map(|(request, permit)| crate::output::embed(&model.engine, request, permit));
        Ok(futures::future::try_join_all(jobs).await?)
    }

    /// Admits and submits a validated request: the one path from a handler to a `TextStream`.
    /// The stream holds its admission and its lease on the model until it is dropped.
    pub fn generate(&self, model: &ModelLease, request: ValidatedRequest) -> Result<TextStream, ApiError> {
        let permit = self.admit()?;
        let text = crate::output::generate(&model.engine, model.codec.clone(), request)?;
        Ok(text.holding((permit, model.clone())))
    }
}

/// Every documented route: the router and the OpenAPI document come from these registrations.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(openai::chat::chat_completions))
        .routes(routes!(openai::completions::completions))
        .routes(routes!(openai::responses::create_response))
        .routes(routes!(
            openai::responses::get_response,
            openai::responses::delete_response
        ))
        .routes(routes!(openai::embeddings::embeddings))
        .routes(routes!(rerank::rerank))
        .routes(routes!(rerank::rerank_alias))
        .routes(routes!(openai::models::list_models))
        .routes(routes!(openai::tokenize::tokenize))
        .routes(routes!(openai::tokenize::detokenize))
        .routes(routes!(anthropic::messages::messages))
        .routes(routes!(anthropic::messages::count_tokens))
        .routes(routes!(ollama::generate::generate))
        .routes(routes!(ollama::chat::chat))
        .routes(routes!(ollama::embed::embed))
        .routes(routes!(ollama::embed::embeddings))
        .routes(routes!(ollama::models::tags))
        .routes(routes!(ollama::models::show))
        .routes(routes!(ollama::models::ps))
        .routes(routes!(ollama::models::version))
        .routes(routes!(ui::root))
        .routes(routes!(ui::asset))
        .routes(routes!(ollama::models::pull))
        .routes(routes!(ollama::models::push))
        .routes(routes!(ollama::models::create))
        .routes(routes!(ollama::models::copy))
        .routes(routes!(ollama::models::delete))
        .routes(routes!(kv_pin::pin))
        .routes(routes!(kv_pin::unpin))
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(openapi::openapi_json))
}

/// The OpenAPI document of every route, as served at `/openapi.json`.
pub fn openapi_document() -> serde_json::Value {
    openapi::finish(api_routes().into_openapi())
}

/// All routes, with body limits, API keys (when configured), tracing and CORS.
pub fn router(state: AppState, options: &ServerOptions) -> Router {
    let (routes, doc) = api_routes().split_for_parts();
    let doc = Arc::new(openapi::finish(doc));
    let mut app = routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(doc))
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(options.body_read_timeout))
        .with_state(state);
    if let Some(policy) = auth::KeyPolicy::from_options(&options.access) {
        app = app.layer(axum::middleware::from_fn_with_state(policy, auth::require_api_key));
    }
    // CORS outermost: preflight requests are answered before the key check. Every answer,
    // a refused key's too, gets its log line.
    app.layer(axum::middleware::from_fn(access_log::log_request))
        .layer(TraceLayer::new_for_http())
        .layer(auth::cors_layer(&options.access.cors_origins))
}

/// What `/health` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or why not.
    pub status: &'static str,
}

/// 200 while every loaded model's engine thread runs, 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "operations", responses(
    (status = 200, description = "The engine serves", body = HealthResponse),
    (status = 503, description = "The engine cannot serve", body = HealthResponse)))]
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.models.loaded().iter().all(|m| m.engine.is_healthy()) {
        (StatusCode::OK, Json(HealthResponse { status: "ok" }))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthResponse {
                status: "engine unavailable",
            }),
        )
    }
}

/// Prometheus text exposition of every loaded model's engine metrics, labelled by model.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let parts: Vec<(String, String)> = state
        .models
        .loaded()
        .iter()
        .map(|m| (m.name().to_string(), m.engine.metrics().render(m.engine.stats())))
        .collect();
    let body = crate::engine::metrics::merge_by_model(&parts);
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
    in_api_shape(&uri, err)
}

/// A known route called with the wrong method: 405 with a JSON body.
async fn method_not_allowed(method: Method, uri: Uri) -> axum::response::Response {
    let err = ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    in_api_shape(&uri, err)
}

/// `err` in Ollama's shape under `/api/`, OpenAI's elsewhere.
fn in_api_shape(uri: &Uri, err: ApiError) -> axum::response::Response {
    if uri.path().starts_with("/api/") {
        ollama::OllamaError(err).into_response()
    } else {
        err.into_response()
    }
}
