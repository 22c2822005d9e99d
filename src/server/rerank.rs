//! `POST /v1/rerank` and `POST /rerank`: how relevant each document is to a query, in the shape
//! Jina's and Cohere's rerank APIs share (and llama-server and vLLM serve). The model is a causal
//! reranker (`text::rerank`): each document becomes one judging prompt whose first answer token
//! is sampled with the logprobs of `yes` and `no` reported; the documents run through the engine
//! together, and their common head (instruction and query) is read from the prefix cache.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, AppJson};
use super::openai::types::UnknownFields;
use super::openai::{choices, reject_unknown};
use super::AppState;
use crate::request::{GenerationSpec, MaxTokens, Prompt, SamplingParams};
use crate::text::rerank::{Reranker, DEFAULT_INSTRUCTION};

/// `POST /v1/rerank`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct RerankRequest {
    /// A reranker model (absent or empty: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    /// What the documents are judged against.
    pub query: String,
    /// The documents: texts, or objects with a `text`.
    #[schema(value_type = Vec<Object>)]
    pub documents: Vec<Value>,
    /// Return only the best `top_n` (default: all).
    #[serde(default)]
    pub top_n: Option<usize>,
    /// Include each document's text in its result (default true).
    #[serde(default)]
    pub return_documents: Option<bool>,
    /// The judging instruction (Qwen3-Reranker's `Instruct`; default: web search relevance).
    #[serde(default)]
    pub instruction: Option<String>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// The documents, most relevant first.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RerankResponse {
    /// `rerank-…`.
    pub id: String,
    /// The model that judged.
    pub model: String,
    /// One result per returned document, by descending relevance.
    pub results: Vec<RerankResult>,
    /// Token accounting.
    pub usage: RerankUsage,
}

/// One document's result.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RerankResult {
    /// Its position in the request's `documents`.
    pub index: usize,
    /// Relevance in [0, 1]: the model's probability of `yes` against `no`.
    pub relevance_score: f32,
    /// `{"text": …}` unless `return_documents` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub document: Option<Value>,
}

/// Rerank token accounting.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RerankUsage {
    /// Prompt tokens of every judging prompt.
    pub prompt_tokens: u32,
    /// The same (a reranker generates nothing it returns).
    pub total_tokens: u32,
}

/// Scores `documents` against `query` and returns them by descending relevance.
#[utoipa::path(post, path = "/v1/rerank", tag = "mlxd", request_body = RerankRequest,
    responses((status = 200, description = "The documents, most relevant first", body = RerankResponse)))]
#[tracing::instrument(skip_all)]
pub async fn rerank(
    State(state): State<AppState>,
    AppJson(req): AppJson<RerankRequest>,
) -> Result<Json<RerankResponse>, ApiError> {
    reject_unknown(&req.unknown, "")?;
    if req.documents.is_empty() {
        return Err(ApiError::invalid("documents", "documents must not be empty"));
    }
    if req.top_n == Some(0) {
        return Err(ApiError::invalid("top_n", "top_n must be at least 1"));
    }
    let texts = req
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| document_text(d, i))
        .collect::<Result<Vec<_>, _>>()?;
    let model = state.model(req.model.as_deref()).await?;
    let named = format!("{} {}", model.name(), model.entry.path.display());
    let Some(reranker) = Reranker::of(&named, &model.codec) else {
        return Err(ApiError::invalid(
            "model",
            format!(
                "model '{}' cannot rerank: a causal reranker (Qwen3-Reranker style, named so) with `yes` and `no` tokens is needed",
                model.name()
            ),
        ));
    };
    let instruction = req.instruction.as_deref().unwrap_or(DEFAULT_INSTRUCTION);
    let mut requests = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let mut spec = GenerationSpec::new(Prompt::Text {
            text: Reranker::prompt(instruction, &req.query, text),
            add_special_tokens: false,
        });
        spec.sampling = SamplingParams {
            report_tokens: vec![reranker.yes, reranker.no],
            ..SamplingParams::greedy()
        };
        spec.max_tokens = MaxTokens::AtMost(1);
        let request = state
            .validate(&model, spec)
            .await
            .map_err(|e| match ApiError::from(e) {
                ApiError::Request(e) => ApiError::invalid(&format!("documents[{i}]"), e.to_string()),
                other => other,
            })?;
        requests.push(request);
    }
    let streams = choices::start(&state, &model, requests, 1).await?;
    let judged = choices::collect_all(streams).await?;
    let mut prompt_tokens = 0;
    let mut results = Vec::with_capacity(judged.len());
    for (index, c) in judged.into_iter().enumerate() {
        prompt_tokens += c.usage.prompt_tokens;
        let reported = c
            .tokens
            .first()
            .and_then(|t| t.logprobs.as_ref())
            .map(|lp| &lp.reported);
        let Some([yes, no]) = reported.map(Vec::as_slice) else {
            return Err(ApiError::invalid(
                &format!("documents[{index}]"),
                "the model produced no judgement for this document",
            ));
        };
        results.push(RerankResult {
            index,
            relevance_score: Reranker::relevance(yes.logprob, no.logprob),
            document: req
                .return_documents
                .unwrap_or(true)
                .then(|| serde_json::json!({"text": texts[index]})),
        });
    }
    results.sort_by(|a, b| {
        b.relevance_score
            .total_cmp(&a.relevance_score)
            .then(a.index.cmp(&b.index))
    });
    results.truncate(req.top_n.unwrap_or(usize::MAX));
    Ok(Json(RerankResponse {
        id: super::openai::new_id("rerank-"),
        model: model.name().to_string(),
        results,
        usage: RerankUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

/// `POST /rerank`: llama-server's path for the same call.
#[utoipa::path(post, path = "/rerank", tag = "mlxd", request_body = RerankRequest,
    responses((status = 200, description = "The documents, most relevant first", body = RerankResponse)))]
pub async fn rerank_alias(
    state: State<AppState>,
    req: AppJson<RerankRequest>,
) -> Result<Json<RerankResponse>, ApiError> {
    rerank(state, req).await
}

/// A document as text: a string, or an object whose one field is `text`.
fn document_text(document: &Value, i: usize) -> Result<String, ApiError> {
    match document {
        Value::String(text) => Ok(text.clone()),
        Value::Object(o) if o.len() == 1 && o.get("text").is_some_and(Value::is_string) => {
            Ok(o["text"].as_str().unwrap_or_default().to_string())
        }
        _ => Err(ApiError::invalid(
            &format!("documents[{i}]"),
            "a document must be a string or {\"text\": string}",
        )),
    }
}
