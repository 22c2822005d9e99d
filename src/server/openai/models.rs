//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::models::parameter_size;
use crate::server::AppState;

/// Lists the one served model, with its family, size and weight format (extensions).
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let info = state.engine.info();
    let m = &info.model;
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "mlxd",
            "max_model_len": info.max_model_len,
            "details": {
                "architecture": m.architecture,
                "family": m.model_type,
                "num_params": m.num_params,
                "parameter_size": parameter_size(m.num_params),
                "format": m.weights.format,
                "quantization": m.weights.dtype,
            },
        }]
    }))
}
