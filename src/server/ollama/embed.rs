//! `POST /api/embed` (one text or a list; `truncate`) and the older `POST /api/embeddings`
//! (one `prompt`): pooled, L2-normalised vectors.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::options::HARDWARE_OPTIONS;
use super::reply::final_stats;
use super::{OllamaError, OllamaJson};
use crate::output::Embedding;
use crate::request::{EmbeddingSpec, Prompt};
use crate::server::openai::embeddings::{check_dimensions, shortened, MAX_INPUTS};
use crate::server::registry::ModelLease;
use crate::server::AppState;

/// `input` of `/api/embed`: one text or several.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbedInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
}

/// `POST /api/embed` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct EmbedRequest {
    /// Model name.
    #[serde(default)]
    pub model: String,
    /// The text(s).
    pub input: EmbedInput,
    /// Cut inputs longer than the context instead of failing (default true).
    pub truncate: Option<bool>,
    /// Keep the first `dimensions` values, renormalised.
    pub dimensions: Option<usize>,
    /// Runtime options (hardware hints only).
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    /// How long to keep the model loaded (advisory: mlxd keeps its one model loaded).
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
}

/// `/api/embed` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbedResponse {
    /// Model name as requested.
    pub model: String,
    /// One vector per input.
    pub embeddings: Vec<Vec<f32>>,
    /// Whole request (ns).
    pub total_duration: u64,
    /// Tokenization (ns; the model is resident).
    pub load_duration: u64,
    /// Tokens of every input.
    pub prompt_eval_count: u32,
}

/// `POST /api/embeddings` body (the older route).
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// Model name.
    #[serde(default)]
    pub model: String,
    /// The text.
    #[serde(default)]
    pub prompt: String,
    /// Runtime options (hardware hints only).
    #[schema(value_type = Option<Object>)]
    pub options: Option<Value>,
    /// Advisory, as on `/api/embed`.
    #[schema(value_type = Option<Object>)]
    pub keep_alive: Option<Value>,
}

/// `/api/embeddings` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// The vector.
    pub embedding: Vec<f32>,
}

/// Embeds one text or a list.
#[utoipa::path(post, path = "/api/embed", tag = "ollama", request_body = EmbedRequest,
    responses((status = 200, description = "One vector per input", body = EmbedResponse)))]
#[tracing::instrument(skip_all)]
pub async fn embed(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<EmbedRequest>,
) -> Result<Json<EmbedResponse>, OllamaError> {
    let started = std::time::Instant::now();
    let model = state.ollama_model(&req.model, req.keep_alive.as_ref()).await?;
    check_options(req.options.as_ref())?;
    let hidden = model.engine.info().model.hidden_size;
    let dimensions = check_dimensions(req.dimensions, hidden).map_err(OllamaError::bad_request)?;
    let texts = match req.input {
        EmbedInput::One(t) => vec![t],
        EmbedInput::Many(v) => v,
    };
    if texts.iter().all(String::is_empty) {
        // Ollama's way to load a model: nothing to embed.
        return Ok(Json(EmbedResponse {
            model: req.model,
            embeddings: Vec::new(),
            total_duration: started.elapsed().as_nanos() as u64,
            load_duration: 0,
            prompt_eval_count: 0,
        }));
    }
    if texts.len() > MAX_INPUTS {
        return Err(OllamaError::bad_request(format!(
            "input must hold at most {MAX_INPUTS} texts, got {}",
            texts.len()
        )));
    }
    let vectors = run(&state, &model, texts, req.truncate.unwrap_or(true)).await?;
    let load = started.elapsed();
    let usage = vectors.iter().fold(crate::request::Usage::default(), |mut u, e| {
        u.prompt_tokens += e.usage.prompt_tokens;
        u
    });
    let stats = final_stats(&usage, started.elapsed(), load);
    Ok(Json(EmbedResponse {
        model: req.model,
        embeddings: vectors.iter().map(|e| shortened(e, dimensions)).collect(),
        total_duration: stats.total_duration.unwrap_or_default(),
        load_duration: stats.load_duration.unwrap_or_default(),
        prompt_eval_count: usage.prompt_tokens,
    }))
}

/// Embeds one `prompt` (the older route).
#[utoipa::path(post, path = "/api/embeddings", tag = "ollama", request_body = EmbeddingsRequest,
    responses((status = 200, description = "The vector", body = EmbeddingsResponse)))]
#[tracing::instrument(skip_all)]
pub async fn embeddings(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, OllamaError> {
    let model = state.ollama_model(&req.model, req.keep_alive.as_ref()).await?;
    check_options(req.options.as_ref())?;
    if req.prompt.is_empty() {
        // Ollama answers an empty prompt with an empty vector (its way to load the model).
        return Ok(Json(EmbeddingsResponse { embedding: Vec::new() }));
    }
    let mut vectors = run(&state, &model, vec![req.prompt], true).await?;
    Ok(Json(EmbeddingsResponse {
        embedding: vectors.pop().map(|e| e.vector).unwrap_or_default(),
    }))
}

async fn run(
    state: &AppState,
    model: &ModelLease,
    texts: Vec<String>,
    truncate: bool,
) -> Result<Vec<Embedding>, OllamaError> {
    let specs = texts
        .into_iter()
        .map(|text| EmbeddingSpec {
            input: Prompt::Text {
                text,
                add_special_tokens: true,
            },
            truncate,
            pooling: model.pooling,
        })
        .collect();
    let requests = state.validate_embeddings(model, specs).await?;
    Ok(state.embed(model, requests).await?)
}

fn check_options(options: Option<&Value>) -> Result<(), OllamaError> {
    let Some(options) = options.filter(|o| !o.is_null()) else {
        return Ok(());
    };
    let map = options
        .as_object()
        .ok_or_else(|| OllamaError::bad_request("options must be an object"))?;
    match map.keys().find(|k| !HARDWARE_OPTIONS.contains(&k.as_str())) {
        Some(key) => Err(OllamaError::bad_request(format!(
            "options.{key} does not apply to embeddings"
        ))),
        None => Ok(()),
    }
}
