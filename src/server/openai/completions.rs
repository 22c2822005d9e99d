//! `POST /v1/completions` (legacy text completions; prompt as text or token ids).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::chat::token_text;
use super::types::{Completion, CompletionChoice, CompletionRequest, PromptInput, UsageOut};
use super::{json_event, new_id, resolve_max_tokens, sampling_params, sse_response, unix_now};
use crate::engine::{FinishReason, GenerateRequest};
use crate::server::error::{ApiError, AppJson};
use crate::server::stream::{collect, GeneratedToken, StreamItem, TextStream};
use crate::server::AppState;
use crate::text::TextCodec;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// Continues a prompt, as one JSON object or an SSE stream.
#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    state.check_model(req.model.as_deref())?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported by this model"));
    }
    if req.logprobs.is_some_and(|n| n > 5) {
        return Err(ApiError::invalid("logprobs", "logprobs must be between 0 and 5"));
    }
    let (params, stops) = sampling_params(&req.sampling, req.logprobs)?;
    let prompt = prompt_ids(&state.codec, req.prompt, state.engine.info().model.vocab_size)?;
    let max_tokens = resolve_max_tokens(
        prompt.len(),
        Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        state.engine.info(),
    )?;
    let prompt_for_reply = req.return_token_ids.then(|| prompt.clone());
    let request = GenerateRequest {
        prompt,
        params,
        max_tokens,
        stop_tokens: state.stop_tokens(req.sampling.ignore_eos),
    };
    let text = state.generate(request, stops)?;
    let meta = CompletionMeta {
        id: new_id("cmpl-"),
        created: unix_now(),
        model: state.model_name.clone(),
        fingerprint: state.fingerprint.clone(),
        codec: state.codec.clone(),
        with_logprobs: req.logprobs.is_some(),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        prompt_token_ids: prompt_for_reply,
    };
    if req.stream {
        return Ok(stream_completion(text, meta));
    }
    let c = collect(text).await?;
    let choice = meta.choice(c.text, &c.tokens, 0, c.reason);
    Ok(Json(meta.object(vec![choice], Some(c.usage.into()))).into_response())
}

/// Tokenizes a text prompt (with BOS as the model wants) or checks a token-id prompt.
fn prompt_ids(codec: &TextCodec, prompt: PromptInput, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let single = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "prompt",
                "exactly one prompt is supported per request",
            ))
        }
    };
    let ids = match prompt {
        PromptInput::Text(t) => codec.encode(&t, true).map_err(|e| ApiError::invalid("prompt", e.0))?,
        PromptInput::Texts(mut v) => {
            single(v.len())?;
            let t = v.remove(0);
            codec.encode(&t, true).map_err(|e| ApiError::invalid("prompt", e.0))?
        }
        PromptInput::Tokens(ids) => ids,
        PromptInput::TokenLists(mut v) => {
            single(v.len())?;
            v.remove(0)
        }
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is out of range (vocabulary size {vocab})"),
        ));
    }
    Ok(ids)
}

struct CompletionMeta {
    id: String,
    created: i64,
    model: String,
    fingerprint: String,
    codec: Arc<TextCodec>,
    with_logprobs: bool,
    include_usage: bool,
    /// Set with `return_token_ids`; sent with the response or the first chunk.
    prompt_token_ids: Option<Vec<u32>>,
}

impl CompletionMeta {
    fn object(&self, choices: Vec<CompletionChoice>, usage: Option<UsageOut>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: self.fingerprint.clone(),
        }
    }

    /// A choice carrying `text` made of `tokens`; `text_offset` is where it starts in the
    /// whole completion (for legacy logprobs).
    fn choice(
        &self,
        text: String,
        tokens: &[GeneratedToken],
        text_offset: usize,
        finish: Option<FinishReason>,
    ) -> CompletionChoice {
        let with_ids = self.prompt_token_ids.is_some();
        CompletionChoice {
            index: 0,
            text,
            logprobs: self
                .with_logprobs
                .then(|| logprobs_json(&self.codec, tokens, text_offset)),
            finish_reason: finish.map(FinishReason::as_str),
            prompt_token_ids: (text_offset == 0).then(|| self.prompt_token_ids.clone()).flatten(),
            token_ids: with_ids.then(|| tokens.iter().map(|t| t.id).collect()),
        }
    }

    fn chunk(&self, choice: CompletionChoice) -> Event {
        json_event(&self.object(vec![choice], None))
    }
}

enum Phase {
    Body { text_offset: usize },
    Usage(UsageOut),
    Done,
    End,
}

fn stream_completion(text: TextStream, meta: CompletionMeta) -> Response {
    let start = (text, meta, Phase::Body { text_offset: 0 });
    let events = futures::stream::unfold(start, move |(mut text, meta, phase)| async move {
        let (event, next) = match phase {
            Phase::Body { text_offset } => match text.next().await {
                Some(StreamItem::Delta { text: t, tokens }) => {
                    let next = Phase::Body {
                        text_offset: text_offset + t.len(),
                    };
                    (meta.chunk(meta.choice(t, &tokens, text_offset, None)), next)
                }
                Some(StreamItem::Done { reason, usage }) => {
                    let next = if meta.include_usage {
                        Phase::Usage(usage.into())
                    } else {
                        Phase::Done
                    };
                    let mut last = meta.choice(String::new(), &[], usize::MAX, Some(reason));
                    last.logprobs = None;
                    (meta.chunk(last), next)
                }
                Some(StreamItem::Error(e)) => (json_event(&ApiError::from(e).openai_body()), Phase::End),
                None => (Event::default().data("[DONE]"), Phase::End),
            },
            Phase::Usage(usage) => (json_event(&meta.object(Vec::new(), Some(usage))), Phase::Done),
            Phase::Done => (Event::default().data("[DONE]"), Phase::End),
            Phase::End => return None,
        };
        Some((Ok::<_, Infallible>(event), (text, meta, next)))
    });
    sse_response(events)
}

/// Legacy logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}`.
fn logprobs_json(codec: &TextCodec, tokens: &[GeneratedToken], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let Some(lp) = &t.logprobs else { continue };
        let text = token_text(codec, t.id);
        offsets.push(offset);
        offset += text.len();
        toks.push(text);
        lps.push(lp.logprob);
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|a| (token_text(codec, a.id), json!(a.logprob)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
