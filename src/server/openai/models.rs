//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::server::AppState;

/// Lists the one served model.
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "mlxd",
            "max_model_len": state.engine.info().max_model_len,
        }]
    }))
}
