//! Model listing and inspection: `/api/tags`, `/api/show`, `/api/ps`, `/api/version`, `/`.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map};

use super::error::OllamaErrorBody;
use super::ollama_name;
use super::types::{OllamaModelDetails, OllamaModelEntry, OllamaModelList, ShowRequest, ShowResponse, VersionResponse};
use super::{OllamaError, OllamaJson};
use crate::models::{parameter_size, ModelSummary};
use crate::server::registry::Described;
use crate::server::AppState;

/// The Ollama API version mlxd follows, reported by `/api/version` for clients that gate
/// features on it.
pub const OLLAMA_API_VERSION: &str = "0.12.0";

/// How far ahead `/api/ps` puts the expiry of a model kept loaded for good.
const RESIDENT_FOR: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 365 * 10);

/// Ollama's (GGUF) architecture name for a Hugging Face `model_type`.
pub fn ollama_architecture(model_type: &str) -> &str {
    match model_type {
        "mistral" | "mixtral" => "llama",
        "gemma3_text" => "gemma3",
        "gemma4_text" => "gemma4",
        "qwen3_moe" => "qwen3moe",
        "gpt_oss" => "gptoss",
        other => other,
    }
}

fn details(summary: &ModelSummary) -> OllamaModelDetails {
    let family = ollama_architecture(&summary.model_type).to_string();
    OllamaModelDetails {
        parent_model: String::new(),
        format: summary.weights.format.to_string(),
        families: vec![family.clone()],
        family,
        parameter_size: parameter_size(summary.num_params),
        quantization_level: summary.weights.dtype.clone(),
    }
}

fn model_entry(d: &Described) -> OllamaModelEntry {
    let name = ollama_name(&d.entry.name);
    let w = &d.summary.weights;
    OllamaModelEntry {
        model: name.clone(),
        name,
        modified_at: Some(
            w.modified
                .and_then(|t| jiff::Timestamp::try_from(t).ok())
                .unwrap_or_else(jiff::Timestamp::now)
                .to_string(),
        ),
        size: w.num_bytes,
        digest: match &d.entry.ollama {
            Some(o) => o.digest.clone(),
            None => w.digest.clone(),
        },
        details: details(&d.summary),
        size_vram: None,
        expires_at: None,
        context_length: None,
    }
}

/// Every model's description (reads headers of the models not loaded: off the async threads).
async fn described(state: &AppState) -> Vec<Described> {
    let models = state.models.clone();
    tokio::task::spawn_blocking(move || models.describe_all())
        .await
        .unwrap_or_default()
}

/// `GET /api/tags`: every model that can be served, loaded or not.
#[utoipa::path(get, path = "/api/tags", tag = "ollama",
    responses((status = 200, description = "Models that can be served", body = OllamaModelList)))]
pub async fn tags(State(state): State<AppState>) -> Json<OllamaModelList> {
    Json(OllamaModelList {
        models: described(&state).await.iter().map(model_entry).collect(),
    })
}

/// `GET /api/ps`: the loaded models, the memory they hold and when they unload.
#[utoipa::path(get, path = "/api/ps", tag = "ollama",
    responses((status = 200, description = "Loaded models", body = OllamaModelList)))]
pub async fn ps(State(state): State<AppState>) -> Json<OllamaModelList> {
    let models = described(&state)
        .await
        .iter()
        .filter_map(|d| {
            let served = d.served.as_ref()?;
            let info = served.engine.info();
            let until = match served.expires_at() {
                Some(t) => t.saturating_duration_since(std::time::Instant::now()),
                None => RESIDENT_FOR.unsigned_abs(),
            };
            let expires = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::try_from(until).unwrap_or(RESIDENT_FOR))
                .unwrap_or(jiff::Timestamp::MAX);
            let on_gpu = !info.device.starts_with("cpu");
            let size = info.model.weights.num_bytes + info.kv_memory_bytes;
            Some(OllamaModelEntry {
                modified_at: None,
                size,
                size_vram: Some(if on_gpu { size } else { 0 }),
                expires_at: Some(expires.to_string()),
                context_length: Some(info.max_model_len),
                ..model_entry(d)
            })
        })
        .collect();
    Json(OllamaModelList { models })
}

/// `POST /api/show`: details, architecture facts, template, parameters, capabilities (the
/// model is loaded to answer).
#[utoipa::path(post, path = "/api/show", tag = "ollama", request_body = ShowRequest,
    responses((status = 200, description = "The model's details", body = ShowResponse)))]
pub async fn show(
    State(state): State<AppState>,
    OllamaJson(req): OllamaJson<ShowRequest>,
) -> Result<Json<ShowResponse>, OllamaError> {
    let name = req.model.or(req.name).unwrap_or_default();
    let model = state.ollama_model(&name, None).await?;
    let info = model.engine.info();
    let m = &info.model;
    let arch = ollama_architecture(&m.model_type);
    let cfg = &m.hf_config;
    let mut model_info = Map::new();
    model_info.insert("general.architecture".into(), json!(arch));
    model_info.insert("general.parameter_count".into(), json!(m.num_params));
    model_info.insert("general.basename".into(), json!(model.name()));
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
    let stop_words: Vec<String> = model
        .limits
        .eos_token_ids
        .iter()
        .map(|&id| model.codec.tokenizer().decode(&[id], false).unwrap_or_default())
        .filter(|s| !s.is_empty())
        .collect();
    let mut parameters: Vec<String> = stop_words.iter().map(|s| format!("stop {s:?}")).collect();
    if let Some(o) = &model.entry.ollama {
        parameters.extend(o.params.iter().map(|(k, v)| format!("{k} {v}")));
    }
    let template = model.codec.chat_template_source().unwrap_or_default();
    let origin = match model.entry.ollama {
        Some(_) => "# TEMPLATE: the GGUF's own chat template (Jinja); Ollama's Go template is not used\n",
        None => "",
    };
    let modelfile = format!(
        "# Modelfile generated by mlxd\n{origin}FROM {}\nTEMPLATE \"\"\"{template}\"\"\"\n{}\n",
        model.entry.path.display(),
        parameters
            .iter()
            .map(|p| format!("PARAMETER {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let summary = model.summary();
    Ok(Json(ShowResponse {
        modelfile,
        parameters: parameters.join("\n"),
        template: template.to_string(),
        details: details(&summary),
        model_info,
        capabilities: capabilities(template),
        modified_at: m
            .weights
            .modified
            .and_then(|t| jiff::Timestamp::try_from(t).ok())
            .unwrap_or_else(jiff::Timestamp::now)
            .to_string(),
        system: model.entry.ollama.as_ref().and_then(|o| o.system.clone()),
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
