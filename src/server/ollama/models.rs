//! Model listing and inspection: `/api/tags`, `/api/show`, `/api/ps`, `/api/version`, `/`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Map};

use super::error::OllamaErrorBody;
use super::types::{OllamaModelDetails, OllamaModelEntry, OllamaModelList, ShowRequest, ShowResponse, VersionResponse};
use super::{OllamaError, OllamaJson};
use crate::models::parameter_size;
use crate::server::AppState;

/// The Ollama API version mlxd follows, reported by `/api/version` for clients that gate
/// features on it.
pub const OLLAMA_API_VERSION: &str = "0.12.0";

/// How long `/api/ps` says the model stays loaded: mlxd never unloads it.
const RESIDENT_FOR: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 365 * 10);

/// Ollama's (GGUF) architecture name for a Hugging Face `model_type`.
pub fn ollama_architecture(model_type: &str) -> &str {
    match model_type {
        "mistral" => "llama",
        "gemma3_text" => "gemma3",
        other => other,
    }
}

fn modified_at(state: &AppState) -> String {
    state
        .engine
        .info()
        .model
        .weights
        .modified
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .unwrap_or_else(jiff::Timestamp::now)
        .to_string()
}

fn details(state: &AppState) -> OllamaModelDetails {
    let m = &state.engine.info().model;
    let family = ollama_architecture(&m.model_type).to_string();
    OllamaModelDetails {
        parent_model: String::new(),
        format: m.weights.format.to_string(),
        families: vec![family.clone()],
        family,
        parameter_size: parameter_size(m.num_params),
        quantization_level: m.weights.dtype.clone(),
    }
}

fn model_entry(state: &AppState) -> OllamaModelEntry {
    let name = state.ollama_name();
    let m = &state.engine.info().model;
    OllamaModelEntry {
        model: name.clone(),
        name,
        modified_at: Some(modified_at(state)),
        size: m.weights.num_bytes,
        digest: m.weights.digest.clone(),
        details: details(state),
        size_vram: None,
        expires_at: None,
        context_length: None,
    }
}

/// `GET /api/tags`: the served model.
#[utoipa::path(get, path = "/api/tags", tag = "ollama",
    responses((status = 200, description = "Models that can be served", body = OllamaModelList)))]
pub async fn tags(State(state): State<AppState>) -> Json<OllamaModelList> {
    Json(OllamaModelList {
        models: vec![model_entry(&state)],
    })
}

/// `GET /api/ps`: the (always) loaded model and the memory it holds.
#[utoipa::path(get, path = "/api/ps", tag = "ollama",
    responses((status = 200, description = "Loaded models", body = OllamaModelList)))]
pub async fn ps(State(state): State<AppState>) -> Json<OllamaModelList> {
    let info = state.engine.info();
    let expires = jiff::Timestamp::now()
        .checked_add(RESIDENT_FOR)
        .unwrap_or(jiff::Timestamp::MAX);
    let entry = OllamaModelEntry {
        modified_at: None,
        size: info.model.weights.num_bytes + info.kv_memory_bytes,
        size_vram: Some(0),
        expires_at: Some(expires.to_string()),
        context_length: Some(info.max_model_len),
        ..model_entry(&state)
    };
    Json(OllamaModelList { models: vec![entry] })
}

/// `POST /api/show`: details, architecture facts, template, parameters, capabilities.
#[utoipa::path(post, path = "/api/show", tag = "ollama", request_body = ShowRequest,
    responses((status = 200, description = "The model's details", body = ShowResponse)))]
pub async fn show(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<ShowRequest>,
) -> Result<Json<ShowResponse>, OllamaError> {
    let name = req.model.or(req.name).unwrap_or_default();
    state.check_ollama_model(&name)?;
    let info = state.engine.info();
    let m = &info.model;
    let arch = ollama_architecture(&m.model_type);
    let cfg = &m.hf_config;
    let mut model_info = Map::new();
    model_info.insert("general.architecture".into(), json!(arch));
    model_info.insert("general.parameter_count".into(), json!(m.num_params));
    model_info.insert("general.basename".into(), json!(state.model_name));
    let facts = [
        ("context_length", json!(info.max_model_len)),
        ("embedding_length", cfg["hidden_size"].clone()),
        ("block_count", json!(m.num_layers)),
        ("feed_forward_length", cfg["intermediate_size"].clone()),
        ("attention.head_count", cfg["num_attention_heads"].clone()),
        ("attention.head_count_kv", json!(m.num_kv_heads)),
        ("attention.key_length", json!(m.head_dim)),
        ("attention.value_length", json!(m.head_dim)),
        ("attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"].clone()),
        ("rope.freq_base", cfg["rope_theta"].clone()),
        ("vocab_size", json!(m.vocab_size)),
    ];
    for (key, value) in facts {
        if !value.is_null() {
            model_info.insert(format!("{arch}.{key}"), value);
        }
    }
    let stop_words: Vec<String> = state
        .limits
        .eos_token_ids
        .iter()
        .map(|&id| state.codec.tokenizer().decode(&[id], false).unwrap_or_default())
        .filter(|s| !s.is_empty())
        .collect();
    let parameters: Vec<String> = stop_words.iter().map(|s| format!("stop {s:?}")).collect();
    let template = state.codec.chat_template_source().unwrap_or_default();
    let modelfile = format!(
        "# Modelfile generated by mlxd\nFROM {}\nTEMPLATE \"\"\"{template}\"\"\"\n{}\n",
        state.model_name,
        parameters
            .iter()
            .map(|p| format!("PARAMETER {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(Json(ShowResponse {
        modelfile,
        parameters: parameters.join("\n"),
        template: template.to_string(),
        details: details(&state),
        model_info,
        capabilities: capabilities(template),
        modified_at: modified_at(&state),
    }))
}

/// What Ollama clients may ask of the model: completion always; tools and thinking with a chat
/// template (tools even when the template has no tool support: mlxd describes them itself).
fn capabilities(template: &str) -> Vec<String> {
    let mut caps = vec!["completion".to_string()];
    if !template.is_empty() {
        caps.push("tools".into());
    }
    if crate::text::reasoning::ThinkTags::detect(template).is_some() {
        caps.push("thinking".into());
    }
    caps
}

/// `GET /api/version`.
#[utoipa::path(get, path = "/api/version", tag = "ollama",
    responses((status = 200, description = "API version", body = VersionResponse)))]
pub async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: OLLAMA_API_VERSION.into(),
        mlxd_version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// `GET /` and `HEAD /`: the liveness text Ollama serves and probes look for.
#[utoipa::path(method(get, head), path = "/", tag = "ollama",
    responses((status = 200, description = "Liveness", body = String, content_type = "text/plain")))]
pub async fn root() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Ollama is running",
    )
}

/// `POST /api/pull`: there is no registry to pull from; the answer says how to serve a model.
#[utoipa::path(post, path = "/api/pull", tag = "ollama",
    responses((status = 400, description = "Not supported: no registry access", body = OllamaErrorBody)))]
pub async fn pull() -> OllamaError {
    OllamaError::bad_request(
        "pulling models is not supported: mlxd has no registry access; download the model \
         (a Hugging Face folder or a .gguf file) and serve it with `mlxd serve --model PATH`",
    )
}

/// `POST /api/push`: there is no registry to push to.
#[utoipa::path(post, path = "/api/push", tag = "ollama",
    responses((status = 400, description = "Not supported: no registry access", body = OllamaErrorBody)))]
pub async fn push() -> OllamaError {
    OllamaError::bad_request("pushing models is not supported: mlxd has no registry access")
}

/// `POST /api/create`, `/api/copy`, `DELETE /api/delete`: the served models are the ones
/// mlxd was started with.
fn fixed_model_set(what: &str) -> OllamaError {
    OllamaError::bad_request(format!(
        "{what} models is not supported: mlxd serves the models it was started with (`--model`)"
    ))
}

/// `POST /api/create`: see [`fixed_model_set`].
#[utoipa::path(post, path = "/api/create", tag = "ollama",
    responses((status = 400, description = "Not supported: fixed model set", body = OllamaErrorBody)))]
pub async fn create() -> OllamaError {
    fixed_model_set("creating")
}

/// `POST /api/copy`: see [`fixed_model_set`].
#[utoipa::path(post, path = "/api/copy", tag = "ollama",
    responses((status = 400, description = "Not supported: fixed model set", body = OllamaErrorBody)))]
pub async fn copy() -> OllamaError {
    fixed_model_set("copying")
}

/// `DELETE /api/delete`: see [`fixed_model_set`].
#[utoipa::path(delete, path = "/api/delete", tag = "ollama",
    responses((status = 400, description = "Not supported: fixed model set", body = OllamaErrorBody)))]
pub async fn delete() -> OllamaError {
    fixed_model_set("deleting")
}
