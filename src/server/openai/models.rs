//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::models::parameter_size;
use crate::server::AppState;
use crate::text::rerank::Reranker;

/// `GET /v1/models` response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Every model that can be served.
    pub data: Vec<ModelCard>,
}

/// One model of the list.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name requests use.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (server start).
    pub created: i64,
    /// Always `mlxd`.
    pub owned_by: &'static str,
    /// Longest prompt + output accepted (vLLM extension).
    pub max_model_len: usize,
    /// Architecture, size and weight format (extension).
    pub details: ModelCardDetails,
}

/// Extension: what the model is.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ModelCardDetails {
    /// `architectures[0]` of config.json.
    pub architecture: String,
    /// `model_type` of config.json.
    pub family: String,
    /// Parameter count.
    pub num_params: u64,
    /// Parameter count, human readable (`494M`).
    pub parameter_size: String,
    /// Weight container (`safetensors`, `mlx`, `gguf`).
    pub format: String,
    /// Weight dtype or quantization.
    pub quantization: String,
    /// A causal reranker (known by its name, `Qwen3-Reranker-…`): `/v1/rerank` takes it.
    pub rerank: bool,
}

/// Lists every model that can be served, loaded or not, with its family, size and weight
/// format (extensions).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The models that can be served", body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let models = state.models.clone();
    let described = tokio::task::spawn_blocking(move || models.describe_all())
        .await
        .unwrap_or_default();
    let data = described
        .into_iter()
        .map(|d| {
            let m = d.summary;
            let rerank = Reranker::named(&d.entry.name) || Reranker::named(&d.entry.path.to_string_lossy());
            ModelCard {
                id: d.entry.name,
                object: "model",
                created: state.created,
                owned_by: "mlxd",
                max_model_len: m.max_position_embeddings,
                details: ModelCardDetails {
                    architecture: m.architecture,
                    family: m.model_type,
                    num_params: m.num_params as u64,
                    parameter_size: parameter_size(m.num_params),
                    format: m.weights.format.to_string(),
                    quantization: m.weights.dtype,
                    rerank,
                },
            }
        })
        .collect();
    Json(ModelList { object: "list", data })
}
