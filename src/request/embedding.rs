//! Embedding requests: one input (text or token ids) whose final hidden states are pooled into
//! one L2-normalised vector. Checked by `validate_embedding`, the embedding twin of
//! `validate`, for every API that embeds.

use super::spec::{Field, Prompt};
use super::validate::{RequestError, RequestLimits, RequestParts, ValidatedRequest};
use super::SamplingParams;
use crate::text::{ReplyPlan, TextCodec};

/// How a sequence's hidden states become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over every token (sentence-transformers' default).
    #[default]
    Mean,
    /// The last token's (decoder embedding models such as Qwen3-Embedding).
    Last,
    /// The first token's (CLS pooling).
    First,
}

impl Pooling {
    /// Whether KV reused from the prefix cache serves this pooling: only the last token's
    /// hidden state is needed, and it is always computed.
    pub fn reuses_cached_prefix(self) -> bool {
        self == Pooling::Last
    }
}

/// An API-neutral embedding request, not yet checked.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingSpec {
    /// Text (tokenized with the model's special tokens) or token ids.
    pub input: Prompt,
    /// Cut an input longer than the context to its start instead of refusing it (Ollama's
    /// `truncate`).
    pub truncate: bool,
    /// How the vector is pooled.
    pub pooling: Pooling,
}

/// Checks `spec` against the served model: tokenizes, checks ids and length.
pub fn validate_embedding(
    spec: EmbeddingSpec,
    codec: &TextCodec,
    limits: &RequestLimits,
) -> Result<ValidatedRequest, RequestError> {
    let invalid = |message: String| RequestError::Invalid {
        field: Field::Input,
        message,
    };
    let mut ids = match spec.input {
        Prompt::Text { text, .. } if text.is_empty() => return Err(invalid("is an empty text".into())),
        Prompt::Text { text, .. } => codec
            .encode(&text, true)
            .map_err(|e| invalid(format!("cannot be tokenized: {e}")))?,
        Prompt::Tokens(ids) => ids,
        Prompt::Chat(_) => return Err(invalid("must be text or token ids".into())),
    };
    if ids.is_empty() {
        return Err(invalid("is empty (it has no tokens)".into()));
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
        return Err(invalid(format!(
            "holds token id {bad}, outside the vocabulary (size {})",
            limits.vocab_size
        )));
    }
    let room = limits.max_model_len.min(limits.kv_pool_tokens);
    if ids.len() > room {
        if !spec.truncate {
            return Err(RequestError::ContextLength {
                field: Field::Input,
                prompt: ids.len(),
                max: 0,
                total: ids.len(),
                ctx: room,
            });
        }
        ids.truncate(room);
    }
    Ok(ValidatedRequest::from_parts(RequestParts {
        prompt: ids,
        params: SamplingParams::greedy(),
        max_tokens: 0,
        stop_tokens: Vec::new(),
        stop_strings: Vec::new(),
        constraint: None,
        reply: ReplyPlan::default(),
        embed: Some(spec.pooling),
        images: Vec::new(),
    }))
}
