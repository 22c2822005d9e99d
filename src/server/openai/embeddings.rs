//! `POST /v1/embeddings`: each input (text, texts, token ids, lists of token ids) becomes one
//! pooled, L2-normalised vector; the inputs run as prefill-only sequences in the engine's
//! batches.

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::reject_unknown;
use super::types::{PromptInput, UnknownFields};
use crate::output::Embedding;
use crate::request::{EmbeddingSpec, Prompt};
use crate::server::error::{ApiError, AppJson};
use crate::server::AppState;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// `POST /v1/embeddings` body.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: Option<String>,
    /// A text, texts, token ids, or lists of token ids.
    pub input: PromptInput,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Keep the first `dimensions` values, renormalised.
    pub dimensions: Option<usize>,
    /// Everything else: advisory fields pass, others are refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// One vector of the response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// `embedding`.
    pub object: &'static str,
    /// The vector.
    pub embedding: EncodedVector,
    /// Position of its input.
    pub index: usize,
}

/// A vector as `encoding_format` asks for it.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EncodedVector {
    /// `float`: the numbers.
    Floats(Vec<f32>),
    /// `base64`: the little-endian f32 bytes, base64-encoded.
    Base64(String),
}

/// `usage` of an embedding response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens of every input.
    pub prompt_tokens: u32,
    /// The same.
    pub total_tokens: u32,
}

/// The response: a list of vectors.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: &'static str,
    /// One vector per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// Model name.
    pub model: String,
    /// Token accounting.
    pub usage: EmbeddingUsage,
}

/// Embeds every input.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest,
    responses((status = 200, description = "One vector per input", body = EmbeddingResponse)))]
#[tracing::instrument(skip_all)]
pub async fn embeddings(
    State(state): State<AppState>,
    AppJson(req): AppJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    reject_unknown(&req.unknown, "")?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64, got '{other}'"),
            ))
        }
    };
    let model = state.model(req.model.as_deref()).await?;
    let hidden = model.engine.info().model.hidden_size;
    let dimensions = check_dimensions(req.dimensions, hidden).map_err(|m| ApiError::invalid("dimensions", m))?;
    let inputs = inputs(req.input)?;
    let specs = inputs
        .into_iter()
        .map(|input| EmbeddingSpec {
            input,
            truncate: false,
            pooling: model.pooling,
        })
        .collect();
    let requests = state.validate_embeddings(&model, specs).await?;
    let vectors = state.embed(&model, requests).await?;
    let prompt_tokens = vectors.iter().map(|e| e.usage.prompt_tokens).sum();
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, e)| EmbeddingData {
            object: "embedding",
            embedding: encode(shortened(&e, dimensions), base64),
            index,
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model: model.name().to_string(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

/// `dimensions` must be between 1 and the model's hidden size.
pub fn check_dimensions(dimensions: Option<usize>, hidden: usize) -> Result<Option<usize>, String> {
    match dimensions {
        Some(d) if d == 0 || d > hidden => Err(format!(
            "dimensions must be between 1 and {hidden} (this model's embedding size), got {d}"
        )),
        d => Ok(d),
    }
}

/// The vector cut to its first `dimensions` values and renormalised (OpenAI's Matryoshka
/// shortening), or as it is.
pub fn shortened(e: &Embedding, dimensions: Option<usize>) -> Vec<f32> {
    let Some(d) = dimensions.filter(|&d| d < e.vector.len()) else {
        return e.vector.clone();
    };
    let head = &e.vector[..d];
    let norm = head.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { (1.0 / norm) as f32 } else { 0.0 };
    head.iter().map(|v| v * scale).collect()
}

fn encode(vector: Vec<f32>, base64: bool) -> EncodedVector {
    if !base64 {
        return EncodedVector::Floats(vector);
    }
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    EncodedVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn inputs(input: PromptInput) -> Result<Vec<Prompt>, ApiError> {
    let inputs = input.into_prompts();
    match inputs.len() {
        0 => Err(ApiError::invalid("input", "input must not be an empty list")),
        n if n > MAX_INPUTS => Err(ApiError::invalid(
            "input",
            format!("at most {MAX_INPUTS} inputs per request, got {n}"),
        )),
        _ => Ok(inputs),
    }
}
