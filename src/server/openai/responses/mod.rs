//! OpenAI's Responses API: `POST /v1/responses` (whole or as its event stream), `GET` and
//! `DELETE /v1/responses/{id}` for stored responses. It rides the same validation, templates,
//! tool and reasoning parsers and prefix cache as chat completions; a continuation
//! (`previous_response_id`) renders the stored conversation first, so its prompt starts with
//! the tokens already cached.

pub mod input;
pub mod output;
pub mod store;
pub mod types;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};

use super::{choices, new_id, unix_now};
use crate::output::StreamItem;
use crate::request::{Field, RequestError};
use crate::server::error::{ApiError, AppJson, OpenAiErrorBody};
use crate::server::{fit, AppState};
use output::ResponseBuilder;
use store::{ResponseStore, StoredResponse};
use types::{DeletedResponse, ResponseObject, ResponsesRequest};

/// Creates a model response for the input (and the stored conversation it continues), as one
/// JSON object or the Responses event stream.
#[utoipa::path(post, path = "/v1/responses", tag = "openai", request_body = ResponsesRequest,
    responses((status = 200,
        description = "The response; with `stream`, SSE events from `response.created` to `response.completed` (or `response.incomplete`, `response.failed`)",
        content((ResponseObject = "application/json"), (Object = "text/event-stream"))),
        (status = 404, description = "`previous_response_id` names no stored response", body = OpenAiErrorBody)))]
#[tracing::instrument(skip_all)]
pub async fn create_response(
    State(state): State<AppState>,
    AppJson(req): AppJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let history = match &req.previous_response_id {
        None => Vec::new(),
        Some(id) => state.responses.conversation(id, Instant::now()).map_err(|missing| {
            let message = if &missing == id {
                format!("Previous response with id '{id}' not found.")
            } else {
                format!("Previous response with id '{id}' continues '{missing}', which is no longer stored.")
            };
            ApiError::ResponseNotFound {
                message,
                param: Some("previous_response_id".into()),
            }
        })?,
    };
    let remote = state
        .image_urls
        .fetch_all(input::image_urls(&req, &history))
        .await
        .map_err(|(field, e)| ApiError::invalid(&field, e))?;
    let prepared = input::prepare(&req, &history, state.reasoning, remote)?;
    let model = state.model(req.model.as_deref()).await?;
    let truncate = prepared.truncate;
    let request = fit::validate_fitted(&state, &model, prepared.spec, truncate)
        .await
        .map_err(named_for_responses)?;
    let stream = choices::start(&state, &model, vec![request], 1).await?.remove(0);
    let store = req.store.unwrap_or(true) && state.responses.enabled();
    let head = ResponseObject {
        id: new_id("resp_"),
        object: "response",
        created_at: unix_now(),
        status: "in_progress",
        error: None,
        incomplete_details: None,
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        model: model.name().to_string(),
        output: Vec::new(),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        previous_response_id: req.previous_response_id.clone(),
        reasoning: echo_reasoning(req.reasoning.as_ref()),
        store,
        temperature: req.temperature.unwrap_or(1.0),
        text: req
            .text
            .clone()
            .filter(|t| t.get("format").is_some_and(|f| !f.is_null()))
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        tools: req.tools.clone().unwrap_or_default(),
        top_p: req.top_p.unwrap_or(1.0),
        truncation: if truncate { "auto" } else { "disabled" },
        usage: None,
        user: req.user.clone(),
        metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
        background: false,
    };
    let keeper = store.then(|| Keeper {
        store: state.responses.clone(),
        input: prepared.input,
        previous: req.previous_response_id.clone(),
    });
    let mut builder = ResponseBuilder::new(head, prepared.shape);
    if req.stream {
        return Ok(stream_response(builder, stream, keeper));
    }
    let mut stream = stream;
    while let Some(item) = stream.next().await {
        if let StreamItem::Error(e) = item {
            return Err(e.into());
        }
        builder.on(item);
    }
    if let Some(keeper) = keeper {
        keeper.keep(builder.response());
    }
    Ok(Json(builder.response()).into_response())
}

/// A stored response, as it was returned.
#[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "The response's id")),
    responses((status = 200, description = "The stored response", body = ResponseObject),
        (status = 404, description = "No stored response has this id", body = OpenAiErrorBody)))]
pub async fn get_response(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state
        .responses
        .get(&id, Instant::now())
        .map(|stored| Json(stored.response))
        .ok_or_else(|| not_stored(&id))
}

/// Forgets a stored response (a continuation of it can no longer be made).
#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "The response's id")),
    responses((status = 200, description = "It was deleted", body = DeletedResponse),
        (status = 404, description = "No stored response has this id", body = OpenAiErrorBody)))]
pub async fn delete_response(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeletedResponse>, ApiError> {
    if !state.responses.delete(&id, Instant::now()) {
        return Err(not_stored(&id));
    }
    Ok(Json(DeletedResponse {
        id,
        object: "response",
        deleted: true,
    }))
}

fn not_stored(id: &str) -> ApiError {
    ApiError::ResponseNotFound {
        message: format!("Response with id '{id}' not found."),
        param: None,
    }
}

/// A validation error with the field named as the Responses API names it.
fn named_for_responses(e: RequestError) -> ApiError {
    match e {
        RequestError::Invalid { field, message } => {
            let name = match field {
                Field::Messages | Field::Prompt | Field::Context => "input",
                Field::MaxTokens | Field::ContextWindow => "max_output_tokens",
                Field::ResponseFormat => "text.format",
                other => other.openai_name(),
            };
            ApiError::invalid(name, format!("{name} {message}"))
        }
        other => other.into(),
    }
}

/// `reasoning` as echoed: `{"effort", "summary"}` with nulls for what was not asked.
fn echo_reasoning(reasoning: Option<&Value>) -> Value {
    let field = |key: &str| reasoning.and_then(|r| r.get(key)).cloned().unwrap_or(Value::Null);
    json!({"effort": field("effort"), "summary": field("summary")})
}

/// Stores a finished response (for `store: true`) with its own input.
struct Keeper {
    store: Arc<ResponseStore>,
    input: Vec<Value>,
    previous: Option<String>,
}

impl Keeper {
    fn keep(self, response: &ResponseObject) {
        if response.status == "failed" {
            return;
        }
        let stored = StoredResponse {
            response: serde_json::to_value(response).unwrap_or(Value::Null),
            input: self.input,
            previous: self.previous,
        };
        if let Err(e) = self.store.put(response.id.clone(), stored, Instant::now()) {
            tracing::warn!(id = %response.id, error = %e, "a response could not be stored");
        }
    }
}

/// The response as the Responses event stream (each event named by its type); stored once
/// it finished.
fn stream_response(
    mut builder: ResponseBuilder,
    stream: crate::output::TextStream,
    keeper: Option<Keeper>,
) -> Response {
    let start = builder.start();
    let mut keeper = keeper;
    let body = choices::merged(vec![stream]).map(move |(_, item)| {
        let events = builder.on(item);
        if builder.finished() {
            if let Some(keeper) = keeper.take() {
                keeper.keep(builder.response());
            }
        }
        events
    });
    let events = futures::stream::iter(start)
        .chain(body.flat_map(futures::stream::iter))
        .map(|data| {
            let name = data["type"].as_str().unwrap_or("message").to_string();
            Ok::<_, Infallible>(Event::default().event(name).data(data.to_string()))
        });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
