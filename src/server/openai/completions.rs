//! `POST /v1/completions` (legacy text completions: prompt as text, token ids, or a list of
//! either; `n` copies of each; `echo`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::choices::{self, check_n, named_by_id, total_usage};
use super::types::{Completion, CompletionChoice, CompletionRequest, UsageOut};
use super::{
    check_stream_options, json_event, new_id, reject_unknown, response_constraint, sampling_params, sse_response,
    unix_now,
};
use crate::output::{GeneratedToken, StreamItem};
use crate::request::{FinishReason, GenerationSpec, MaxTokens, Usage, ValidatedRequest};
use crate::server::error::{ApiError, AppJson};
use crate::server::registry::ModelLease;
use crate::server::AppState;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// Continues one or more prompts, as one JSON object or an SSE stream.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses((status = 200,
        description = "The completion; with `stream`, SSE `text_completion` events ending in `data: [DONE]`",
        content((Completion = "application/json"), (Completion = "text/event-stream")))))]
#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<AppState>,
    AppJson(req): AppJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let specs = to_specs(&req)?;
    let n = check_n(req.sampling.n, specs.len())?;
    if req.best_of.is_some_and(|b| b as usize != n && b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            "best_of must equal n (no server-side ranking)",
        ));
    }
    let model = state.model(req.model.as_deref()).await?;
    let mut requests = Vec::with_capacity(specs.len());
    for spec in specs {
        requests.push(state.validate(&model, spec).await?);
    }
    let meta = CompletionMeta {
        id: new_id("cmpl-"),
        created: unix_now(),
        model: model.name().to_string(),
        fingerprint: model.fingerprint.clone(),
        with_logprobs: req.logprobs.is_some(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        with_token_ids: req.return_token_ids,
        tokens_by_id: req.return_tokens_as_token_ids,
        prompts: prompt_echoes(&model, &requests, req.echo),
        n,
    };
    let mut streams = choices::start(&state, &model, requests, n).await?;
    if req.stream {
        // The prompt's logprobs are all in once its first token is: the first chunk carries them.
        let mut prompt_tokens = Vec::with_capacity(streams.len());
        for stream in &mut streams {
            stream.wait_first_token().await;
            prompt_tokens.push(stream.prompt_tokens());
        }
        return Ok(stream_completion(streams, Arc::new(meta), prompt_tokens));
    }
    let results = choices::collect_all(streams).await?;
    let usages: Vec<Usage> = results.iter().map(|c| c.usage).collect();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (echo, echo_len) = meta.echo(i);
            if c.prompt_tokens.is_empty() {
                return meta.choice(i, echo + &c.text, &c.tokens, echo_len, c.reason, true);
            }
            let tokens = [c.prompt_tokens, c.tokens].concat();
            meta.choice(i, echo + &c.text, &tokens, 0, c.reason, true)
        })
        .collect();
    Ok(Json(meta.object(choices, Some(total_usage(&usages, n)))).into_response())
}

/// One API-neutral spec per prompt (OpenAI's defaults; ranges are checked later).
fn to_specs(req: &CompletionRequest) -> Result<Vec<GenerationSpec>, ApiError> {
    reject_unknown(&req.unknown, "")?;
    check_stream_options(req.stream, req.stream_options.as_ref())?;
    let constraint = response_constraint(req.response_format.as_ref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported by this model"));
    }
    let prompts = req.prompt.clone().into_prompts();
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt must not be an empty list"));
    }
    let mut sampling = sampling_params(&req.sampling, req.logprobs)?;
    // `echo` with `logprobs`: the echoed prompt's tokens come with theirs.
    sampling.prompt_logprobs = req.logprobs.filter(|_| req.echo);
    let stop = req.sampling.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    Ok(prompts
        .into_iter()
        .map(|prompt| {
            let mut spec = GenerationSpec::new(prompt);
            spec.sampling = sampling.clone();
            spec.max_tokens = MaxTokens::Exactly(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
            spec.stop = stop.clone();
            spec.ignore_eos = req.sampling.ignore_eos;
            spec.constraint = constraint.clone();
            spec
        })
        .collect())
}

/// Per prompt: its ids, and its text when `echo` asks for it back.
fn prompt_echoes(model: &ModelLease, requests: &[ValidatedRequest], echo: bool) -> Vec<(Vec<u32>, String)> {
    requests
        .iter()
        .map(|r| {
            let text = if echo {
                model.codec.decode(r.prompt())
            } else {
                String::new()
            };
            (r.prompt().to_vec(), text)
        })
        .collect()
}

struct CompletionMeta {
    id: String,
    created: i64,
    model: String,
    fingerprint: String,
    with_logprobs: bool,
    include_usage: bool,
    /// `return_token_ids`: add the prompt's ids (first chunk) and the generated ids.
    with_token_ids: bool,
    /// `return_tokens_as_token_ids`: logprob tokens named `token_id:N`.
    tokens_by_id: bool,
    /// Per prompt: ids and echoed text (empty without `echo`).
    prompts: Vec<(Vec<u32>, String)>,
    n: usize,
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

    /// The echoed prompt text of choice `index` and the offset its completion starts at.
    fn echo(&self, index: usize) -> (String, usize) {
        let text = self.prompts[index / self.n].1.clone();
        let len = text.len();
        (text, len)
    }

    /// Choice `index` carrying `text` made of `tokens`; `text_offset` is where the tokens'
    /// text starts in the choice's whole text (legacy logprobs); `first` adds the prompt ids.
    fn choice(
        &self,
        index: usize,
        text: String,
        tokens: &[GeneratedToken],
        text_offset: usize,
        finish: Option<FinishReason>,
        first: bool,
    ) -> CompletionChoice {
        CompletionChoice {
            index: index as u32,
            text,
            logprobs: self
                .with_logprobs
                .then(|| logprobs_json(&named_by_id(tokens, self.tokens_by_id), text_offset)),
            finish_reason: finish.map(FinishReason::as_str),
            prompt_token_ids: (self.with_token_ids && first).then(|| self.prompts[index / self.n].0.clone()),
            token_ids: self.with_token_ids.then(|| tokens.iter().map(|t| t.id).collect()),
        }
    }

    fn chunk(&self, choice: CompletionChoice) -> Event {
        json_event(&self.object(vec![choice], None))
    }
}

/// Per-choice progress of a stream.
#[derive(Clone, Default)]
struct ChoiceProgress {
    started: bool,
    text_offset: usize,
}

/// The choices as SSE chunks; `prompt_tokens` (per choice; empty without prompt logprobs)
/// lead the first chunk's logprobs.
fn stream_completion(
    streams: Vec<crate::output::TextStream>,
    meta: Arc<CompletionMeta>,
    mut prompt_tokens: Vec<Vec<GeneratedToken>>,
) -> Response {
    let num_choices = streams.len();
    let mut progress = vec![ChoiceProgress::default(); num_choices];
    let mut usages = vec![Usage::default(); num_choices];
    let mut remaining = num_choices;
    let mut failed = false;
    let body = choices::merged(streams).map(move |(i, item)| {
        let mut events = Vec::new();
        if failed {
            return events;
        }
        match item {
            StreamItem::Delta { text, tokens, .. } => {
                let p = &mut progress[i];
                let (echo, echo_len) = if p.started { (String::new(), 0) } else { meta.echo(i) };
                let mut offset = p.text_offset + echo_len;
                let first = !p.started;
                p.started = true;
                p.text_offset = offset + text.len();
                let prompt = std::mem::take(&mut prompt_tokens[i]);
                let tokens = if prompt.is_empty() {
                    tokens
                } else {
                    offset = 0;
                    [prompt, tokens].concat()
                };
                events.push(meta.chunk(meta.choice(i, echo + &text, &tokens, offset, None, first)));
            }
            StreamItem::Done { reason, usage, .. } => {
                usages[i] = usage;
                remaining -= 1;
                let mut last = meta.choice(i, String::new(), &[], 0, Some(reason), false);
                last.logprobs = None;
                last.token_ids = None;
                events.push(meta.chunk(last));
                if remaining == 0 {
                    if meta.include_usage {
                        let usage = total_usage(&usages, meta.n);
                        events.push(json_event(&meta.object(Vec::new(), Some(usage))));
                    }
                    events.push(Event::default().data("[DONE]"));
                }
            }
            StreamItem::Error(e) => {
                failed = true;
                events.push(json_event(&ApiError::from(e).openai_body()));
            }
        }
        events
    });
    sse_response(body.flat_map(futures::stream::iter).map(Ok::<_, Infallible>))
}

/// Legacy logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}`, each token's text as
/// it reads in the completion.
fn logprobs_json(tokens: &[GeneratedToken], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        offsets.push(offset);
        offset += t.text.len();
        toks.push(t.text.clone());
        // An echoed prompt's first token has no logprob: nothing comes before it.
        let Some(lp) = &t.logprobs else {
            lps.push(Value::Null);
            tops.push(Value::Null);
            continue;
        };
        lps.push(json!(lp.logprob));
        let top: Map<String, Value> = lp
            .top
            .iter()
            .zip(&t.top_texts)
            .map(|(a, text)| (text.clone(), json!(a.logprob)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
