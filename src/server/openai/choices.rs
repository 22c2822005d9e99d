//! Several choices from one request: `n` copies of each prompt and lists of prompts. The copies
//! of a prompt fork from one prefill: the first copy runs until its first token, which puts
//! the prompt's full KV blocks in the prefix cache; the others then start from those shared
//! blocks and compute only the last partial block.

use futures::stream::{BoxStream, StreamExt};

use super::types::UsageOut;
use crate::output::{collect, Collected, GeneratedToken, StreamItem, TextStream};
use crate::request::{Usage, ValidatedRequest};
use crate::server::error::ApiError;
use crate::server::registry::ModelLease;
use crate::server::AppState;

/// Most choices one request may ask for (`n` times the number of prompts).
pub const MAX_CHOICES: usize = 64;

/// Checks `n` (the copies of each prompt) for `num_prompts` prompts.
pub fn check_n(n: Option<u32>, num_prompts: usize) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::invalid("n", "n must be at least 1"));
    }
    if n * num_prompts > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("at most {MAX_CHOICES} choices per request (n times the number of prompts)"),
        ));
    }
    Ok(n)
}

/// Starts `n` generations of every request; choice `i * n + j` is copy `j` of request `i`.
/// Copy `j` of a seeded request uses seed + j, so the copies differ but stay reproducible.
/// Returns once every generation left the queue, so a queue timeout is still an HTTP status.
pub async fn start(
    state: &AppState,
    model: &ModelLease,
    requests: Vec<ValidatedRequest>,
    n: usize,
) -> Result<Vec<TextStream>, ApiError> {
    let mut streams = Vec::with_capacity(requests.len() * n);
    for request in requests {
        let seed = request.params().seed;
        let mut first = state.generate(model, request.clone())?;
        if n > 1 {
            first.wait_first_token().await;
        }
        streams.push(first);
        for j in 1..n {
            let copy = request.clone().with_seed(seed.map(|s| s.wrapping_add(j as u64)));
            streams.push(state.generate(model, copy)?);
        }
    }
    for stream in &mut streams {
        stream.wait_scheduled().await?;
    }
    Ok(streams)
}

/// Every stream's items, tagged with the stream's index, in arrival order.
pub fn merged(streams: Vec<TextStream>) -> BoxStream<'static, (usize, StreamItem)> {
    let tagged = streams.into_iter().enumerate().map(|(i, s)| {
        futures::stream::unfold(s, move |mut s| async move { s.next().await.map(|item| ((i, item), s)) }).boxed()
    });
    futures::stream::select_all(tagged).boxed()
}

/// Folds every stream; the first error fails the whole request.
pub async fn collect_all(streams: Vec<TextStream>) -> Result<Vec<Collected>, ApiError> {
    let results = futures::future::join_all(streams.into_iter().map(collect)).await;
    results.into_iter().map(|r| r.map_err(ApiError::from)).collect()
}

/// Usage of a multi-choice request: each prompt counted once, every completion counted.
pub fn total_usage(usages: &[Usage], n: usize) -> UsageOut {
    let mut total = Usage::default();
    for (i, u) in usages.iter().enumerate() {
        if i % n == 0 {
            total.prompt_tokens += u.prompt_tokens;
            total.cached_tokens += u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
    }
    total.into()
}

/// vLLM's `return_tokens_as_token_ids`: logprob entries name tokens `token_id:N` instead of by
/// their text, so clients can tell apart tokens with the same text (or no valid UTF-8).
pub fn named_by_id(tokens: &[GeneratedToken], by_id: bool) -> std::borrow::Cow<'_, [GeneratedToken]> {
    if !by_id {
        return std::borrow::Cow::Borrowed(tokens);
    }
    let name = |id: u32| format!("token_id:{id}");
    std::borrow::Cow::Owned(
        tokens
            .iter()
            .map(|t| GeneratedToken {
                text: name(t.id),
                top_texts: t
                    .logprobs
                    .as_ref()
                    .map_or_else(Vec::new, |lp| lp.top.iter().map(|a| name(a.id)).collect()),
                ..t.clone()
            })
            .collect(),
    )
}
