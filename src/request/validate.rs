//! The one validation step: `GenerationSpec` → `ValidatedRequest`, the only request type the
//! engine accepts. Renders the chat template, tokenizes, checks every sampling range, token id,
//! stop string and length against the served model, and resolves the generation budget.
//!
//! Runs on the caller's thread; rendering and tokenizing a long conversation takes
//! milliseconds, so async callers run it on a blocking thread.

use std::sync::Arc;

use super::images::{digest, ImageProcessor, ImageSpan, PromptImage};
use super::spec::{Field, GenerationSpec, MaxTokens, Overflow, Prompt};
use super::SamplingParams;
use crate::text::{ChatPrompt, Constraint, OutputConstraint, ReplyPlan, TextCodec};

/// Most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// Most alternatives reported per token.
pub const MAX_TOP_LOGPROBS: u8 = 20;
/// Largest absolute logit bias (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// Tokens kept from a prompt's start when its middle is cut (`Overflow::CutMiddle`): Ollama's
/// default `num_keep`, enough for the template's opening (BOS, the first role marker).
pub const KEPT_HEAD_TOKENS: usize = 4;

/// What a request is checked against: facts of the served model and its KV pool.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestLimits {
    /// The served model's name, for errors that name it.
    pub model: String,
    /// How the model takes images (None: it has no vision input).
    pub vision: Option<Arc<ImageProcessor>>,
    /// Longest prompt + output the engine accepts.
    pub max_model_len: usize,
    /// Tokens the whole KV pool holds.
    pub kv_pool_tokens: usize,
    /// Tokens per KV block (a request occupies whole blocks).
    pub block_size: usize,
    /// Valid token ids are `0..vocab_size`.
    pub vocab_size: usize,
    /// Ids that end generation unless `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    /// The budget of a request that sets none (`MaxTokens::Rest`); None: the room left.
    pub default_max_tokens: Option<usize>,
}

/// Why a request was refused; every variant is the client's to fix (HTTP 400).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field holds a value outside its range, or the prompt is unusable.
    #[error("{message}")]
    Invalid {
        /// The offending field.
        field: Field,
        /// What is wrong, without the field's wire name.
        message: String,
    },
    /// Prompt plus requested output exceed the context.
    #[error("This model's maximum context length is {ctx} tokens. However, you requested {total} tokens ({prompt} in the prompt, {max} for the completion). Please reduce the length of the prompt or max_tokens.")]
    ContextLength {
        /// `messages` for a conversation, `prompt` otherwise.
        field: Field,
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        max: usize,
        /// prompt + max.
        total: usize,
        /// The context length.
        ctx: usize,
    },
    /// Prompt plus output can never fit into the KV memory, even alone.
    #[error(
        "request needs {needed} KV blocks but the pool only has {total}; raise --kv-memory or shorten the request"
    )]
    TooLargeForKvPool {
        /// Blocks the request needs at its maximum length.
        needed: usize,
        /// Blocks in the whole pool.
        total: usize,
    },
}

impl RequestError {
    fn invalid(field: Field, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }

    /// The field to blame, when there is one.
    pub fn field(&self) -> Option<Field> {
        match self {
            Self::Invalid { field, .. } | Self::ContextLength { field, .. } => Some(*field),
            Self::TooLargeForKvPool { .. } => None,
        }
    }
}

/// A request that passed `validate`: tokenized, range-checked and sized. Its fields are
/// private so that nothing else can make one; the engine takes it apart with `into_parts`.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedRequest {
    parts: RequestParts,
}

/// The contents of a `ValidatedRequest`, for its consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestParts {
    /// Prompt token ids (non-empty, all in the vocabulary).
    pub prompt: Vec<u32>,
    /// Range-checked sampling parameters.
    pub params: SamplingParams,
    /// Generation budget (≥ 1; prompt + budget fit the context and the KV pool).
    pub max_tokens: u32,
    /// Ids that end generation with `stop`.
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation (non-empty), matched by the text stage.
    pub stop_strings: Vec<String>,
    /// The compiled output constraint, fresh (nothing consumed yet).
    pub constraint: Option<Constraint>,
    /// How the reply is read (thoughts, tool calls); the default for plain text prompts.
    pub reply: ReplyPlan,
    /// An embedding request: prefill only, the hidden states pooled this way.
    pub embed: Option<super::Pooling>,
    /// The prompt's images, in prompt order, each on its soft tokens.
    pub images: Vec<PromptImage>,
}

impl ValidatedRequest {
    /// Wraps parts checked by one of this module's validations.
    pub(super) fn from_parts(parts: RequestParts) -> Self {
        Self { parts }
    }

    /// Prompt token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.parts.prompt
    }

    /// Sampling parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.parts.params
    }

    /// Generation budget.
    pub fn max_tokens(&self) -> u32 {
        self.parts.max_tokens
    }

    /// Stop strings for the text stage.
    pub fn stop_strings(&self) -> &[String] {
        &self.parts.stop_strings
    }

    /// How the reply is read, for the text stage.
    pub fn reply(&self) -> &ReplyPlan {
        &self.parts.reply
    }

    /// The same request with another seed (the copies of an `n > 1` request).
    pub fn with_seed(mut self, seed: Option<u64>) -> Self {
        self.parts.params.seed = seed;
        self
    }

    /// Takes the request apart.
    pub fn into_parts(self) -> RequestParts {
        self.parts
    }
}

/// Checks `spec` against the served model: the ONE place where a request is validated.
pub fn validate(
    spec: GenerationSpec,
    codec: &TextCodec,
    limits: &RequestLimits,
) -> Result<ValidatedRequest, RequestError> {
    check_sampling(&spec.sampling, limits)?;
    let stop_strings = check_stops(spec.stop)?;
    let prompt_field = match spec.prompt {
        Prompt::Chat(_) => Field::Messages,
        _ => Field::Prompt,
    };
    let mut constraint = spec.constraint;
    if let Prompt::Chat(chat) = &spec.prompt {
        let forced = check_tools(chat, codec, constraint.is_some())?;
        constraint = constraint.or(forced);
    }
    let (mut prompt, reply, images) = tokenize(&spec.context, spec.prompt, codec, limits)?;
    // A cut could split an image's soft tokens: a prompt with images is fitted whole or refused.
    if spec.overflow == Overflow::CutMiddle && images.is_empty() {
        prompt = cut_to_fit(prompt, spec.max_tokens, spec.context_window, limits);
    }
    let max_tokens = resolve_max_tokens(prompt.len(), spec.max_tokens, spec.context_window, prompt_field, limits)?;
    let stop_tokens = if spec.ignore_eos {
        Vec::new()
    } else {
        limits.eos_token_ids.clone()
    };
    let field = match constraint {
        Some(OutputConstraint::Grammar(_)) => Field::Tools,
        _ => Field::ResponseFormat,
    };
    let constraint = constraint
        .map(|c| codec.grammar().compile(&c, limits.vocab_size))
        .transpose()
        .map_err(|e| RequestError::invalid(field, format!("cannot be enforced: {e}")))?;
    Ok(ValidatedRequest {
        parts: RequestParts {
            prompt,
            params: spec.sampling,
            max_tokens,
            stop_tokens,
            stop_strings,
            constraint,
            reply,
            embed: None,
            images,
        },
    })
}

/// Checks a conversation's tools and choice; returns the constraint that forces a call when
/// the choice requires one (not together with `response_format`).
fn check_tools(
    chat: &ChatPrompt,
    codec: &TextCodec,
    has_format: bool,
) -> Result<Option<OutputConstraint>, RequestError> {
    chat.tools.check().map_err(|(at, message)| {
        // The field leads the message already; a path inside `tools` is named after it.
        if at == "tool_choice" {
            RequestError::invalid(Field::ToolChoice, message)
        } else {
            RequestError::invalid(Field::Tools, format!("{at}: {message}"))
        }
    })?;
    let forced = codec.forced_call(&chat.tools);
    if forced.is_some() && has_format {
        return Err(RequestError::invalid(
            Field::ToolChoice,
            "a required tool call cannot be combined with response_format",
        ));
    }
    Ok(forced)
}

fn check_sampling(p: &SamplingParams, limits: &RequestLimits) -> Result<(), RequestError> {
    let check = |ok: bool, field: Field, what: &str, value: f32| {
        if ok {
            Ok(())
        } else {
            Err(RequestError::invalid(field, format!("must be {what}, got {value}")))
        }
    };
    let t = p.temperature;
    check(
        t.is_finite() && t >= 0.0,
        Field::Temperature,
        "a number of at least 0",
        t,
    )?;
    check(p.top_p > 0.0 && p.top_p <= 1.0, Field::TopP, "in (0, 1]", p.top_p)?;
    check((0.0..=1.0).contains(&p.min_p), Field::MinP, "in [0, 1]", p.min_p)?;
    let r = p.repetition_penalty;
    check(
        r.is_finite() && r > 0.0,
        Field::RepetitionPenalty,
        "a positive number",
        r,
    )?;
    let pp = p.presence_penalty;
    check(
        (-2.0..=2.0).contains(&pp),
        Field::PresencePenalty,
        "between -2 and 2",
        pp,
    )?;
    let fp = p.frequency_penalty;
    check(
        (-2.0..=2.0).contains(&fp),
        Field::FrequencyPenalty,
        "between -2 and 2",
        fp,
    )?;
    if let Some(n) = [p.logprobs, p.prompt_logprobs]
        .into_iter()
        .flatten()
        .find(|&n| n > MAX_TOP_LOGPROBS)
    {
        return Err(RequestError::invalid(
            Field::Logprobs,
            format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    if let Some(id) = p.report_tokens.iter().find(|&&id| id as usize >= limits.vocab_size) {
        return Err(RequestError::invalid(
            Field::Logprobs,
            format!(
                "names token id {id}, outside the vocabulary (size {})",
                limits.vocab_size
            ),
        ));
    }
    for &(id, bias) in &p.logit_bias {
        if id as usize >= limits.vocab_size {
            return Err(RequestError::invalid(
                Field::LogitBias,
                format!(
                    "names token id {id}, outside the vocabulary (size {})",
                    limits.vocab_size
                ),
            ));
        }
        check(
            (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias),
            Field::LogitBias,
            "a bias between -100 and 100",
            bias,
        )?;
    }
    Ok(())
}

fn check_stops(stops: Vec<String>) -> Result<Vec<String>, RequestError> {
    // An empty stop string can never end anything; it means "no stop" and is dropped.
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(RequestError::invalid(
            Field::Stop,
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stops.len()
            ),
        ));
    }
    Ok(stops)
}

/// The ids of `prompt` alone as `validate` makes them (a conversation templated, its images
/// decoded and expanded into their soft tokens, every id checked) and nothing else of a
/// request checked: what `/tokenize` answers, so its count is the one a request's usage reports.
pub fn tokenize_prompt(prompt: Prompt, codec: &TextCodec, limits: &RequestLimits) -> Result<Vec<u32>, RequestError> {
    tokenize(&[], prompt, codec, limits).map(|(ids, _, _)| ids)
}

/// `context` followed by the tokenized prompt (never empty, every id in the vocabulary), how
/// the reply is read (for a conversation, from its rendering) and the prompt's images.
fn tokenize(
    context: &[u32],
    prompt: Prompt,
    codec: &TextCodec,
    limits: &RequestLimits,
) -> Result<(Vec<u32>, ReplyPlan, Vec<PromptImage>), RequestError> {
    check_ids(context, Field::Context, limits.vocab_size)?;
    let mut reply = ReplyPlan::default();
    let mut images = Vec::new();
    let (field, mut ids) = match prompt {
        Prompt::Chat(chat) => {
            if chat.messages.is_empty() {
                return Err(RequestError::invalid(
                    Field::Messages,
                    "must contain at least one message",
                ));
            }
            let rendered = codec.render_chat(&chat).map_err(|e| {
                RequestError::invalid(Field::Messages, format!("cannot be rendered by the chat template: {e}"))
            })?;
            let prepared = prepare_images(&chat, limits)?;
            let expanded = match (&limits.vision, prepared.is_empty()) {
                (Some(vision), false) => expand_images(&rendered, vision, prepared.len())?,
                _ => rendered.clone(),
            };
            let ids = codec
                .encode(&expanded, false)
                .map_err(|e| RequestError::invalid(Field::Messages, format!("cannot be tokenized: {e}")))?;
            if let Some(vision) = &limits.vision {
                images = place_images(&ids, vision, prepared, context.len())?;
            }
            reply = codec.reply_plan(&chat, &rendered);
            (Field::Messages, ids)
        }
        Prompt::Text {
            text,
            add_special_tokens,
        } => {
            let add = add_special_tokens && context.is_empty();
            let ids = codec
                .encode(&text, add)
                .map_err(|e| RequestError::invalid(Field::Prompt, format!("cannot be tokenized: {e}")))?;
            (Field::Prompt, ids)
        }
        Prompt::Tokens(ids) => (Field::Prompt, ids),
    };
    check_ids(&ids, field, limits.vocab_size)?;
    if !context.is_empty() && codec.bos_id().is_some() && ids.first().copied() == codec.bos_id() {
        // A continuation must not restart the sequence with another BOS.
        ids.remove(0);
        images.iter_mut().for_each(|i| i.span.start -= 1);
    }
    if context.is_empty() && ids.is_empty() {
        return Err(RequestError::invalid(
            field,
            "is empty (it has no tokens after templating and tokenization)",
        ));
    }
    let mut all = context.to_vec();
    all.extend(ids);
    Ok((all, reply, images))
}

/// Every image of the conversation decoded and prepared, in order, with its digest; refused
/// when the model has no vision input, when there are more than it takes, or when one cannot
/// be decoded.
fn prepare_images(chat: &ChatPrompt, limits: &RequestLimits) -> Result<Vec<(u64, super::ImagePixels)>, RequestError> {
    let all: Vec<_> = chat.messages.iter().flat_map(|m| &m.images).collect();
    if all.is_empty() {
        return Ok(Vec::new());
    }
    let Some(vision) = &limits.vision else {
        return Err(RequestError::invalid(
            Field::Messages,
            format!("holds an image, but model `{}` has no vision input", limits.model),
        ));
    };
    if all.len() > vision.max_images {
        return Err(RequestError::invalid(
            Field::Messages,
            format!(
                "holds {} images; model `{}` takes at most {} per request",
                all.len(),
                limits.model,
                vision.max_images
            ),
        ));
    }
    all.iter()
        .enumerate()
        .map(|(i, image)| {
            let pixels = vision
                .prepare(&image.bytes)
                .map_err(|e| RequestError::invalid(Field::Messages, format!("image {} {e}", i + 1)))?;
            Ok((digest(&image.bytes), pixels))
        })
        .collect()
}

/// The rendered conversation with each image's marker replaced by the processor's expansion
/// (the marker wrapped around the image's soft tokens), as the model's processor does before
/// tokenizing.
fn expand_images(rendered: &str, vision: &ImageProcessor, count: usize) -> Result<String, RequestError> {
    let placed = rendered.matches(vision.marker.as_str()).count();
    if placed != count {
        return Err(RequestError::invalid(
            Field::Messages,
            format!(
                "holds {count} images, but the rendered conversation marks {placed} image places ({}): images go in user turns, and the text must not hold the marker",
                vision.marker
            ),
        ));
    }
    Ok(rendered.replace(vision.marker.as_str(), &vision.expansion))
}

/// Each image on its run of soft tokens in `ids` (offset by the `context` before them); the
/// runs must be exactly the images' (text holding a soft token's string would add one).
fn place_images(
    ids: &[u32],
    vision: &ImageProcessor,
    prepared: Vec<(u64, super::ImagePixels)>,
    offset: usize,
) -> Result<Vec<PromptImage>, RequestError> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != vision.image_token {
            i += 1;
            continue;
        }
        let start = i;
        while i < ids.len() && ids[i] == vision.image_token {
            i += 1;
        }
        runs.push((start, i - start));
    }
    let well_formed = runs.len() == prepared.len() && runs.iter().all(|&(_, n)| n == vision.tokens_per_image);
    if !well_formed {
        return Err(RequestError::invalid(
            Field::Messages,
            "holds the model's image token as text; it stands only for images",
        ));
    }
    Ok(runs
        .into_iter()
        .zip(prepared)
        .map(|((start, len), (digest, pixels))| PromptImage {
            span: ImageSpan {
                start: offset + start,
                len,
                digest,
            },
            pixels: Arc::new(pixels),
        })
        .collect())
}

fn check_ids(ids: &[u32], field: Field, vocab: usize) -> Result<(), RequestError> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(RequestError::invalid(
            field,
            format!("holds token id {bad}, outside the vocabulary (size {vocab})"),
        )),
        None => Ok(()),
    }
}

/// Tokens the context holds for one request: the model's (or the request's smaller) window,
/// in whole KV blocks of the pool.
fn usable_context(context_window: Option<usize>, limits: &RequestLimits) -> usize {
    let ctx = context_window.map_or(limits.max_model_len, |w| w.min(limits.max_model_len));
    let pool_tokens = limits.kv_pool_tokens - limits.kv_pool_tokens % limits.block_size.max(1);
    ctx.min(pool_tokens)
}

/// `prompt`, when it leaves no room for a reply, with tokens cut out after its first
/// KEPT_HEAD_TOKENS so that the reply gets its budget or a quarter of the context, whichever
/// is less; its end (the latest turn and the generation prompt) stays whole. Logged, as Ollama
/// logs its runner's cut.
fn cut_to_fit(
    prompt: Vec<u32>,
    max_tokens: MaxTokens,
    context_window: Option<usize>,
    limits: &RequestLimits,
) -> Vec<u32> {
    let usable = usable_context(context_window, limits);
    if prompt.len() < usable {
        return prompt;
    }
    let wanted = match max_tokens {
        MaxTokens::Exactly(n) | MaxTokens::AtMost(n) => n as usize,
        MaxTokens::Rest => limits.default_max_tokens.unwrap_or(usize::MAX),
    };
    let kept = usable.saturating_sub(wanted.clamp(1, (usable / 4).max(1)));
    if kept <= KEPT_HEAD_TOKENS {
        // No room for a head and an end: the budget check refuses it by its real length.
        return prompt;
    }
    let tail = prompt.len() - (kept - KEPT_HEAD_TOKENS);
    tracing::warn!(
        prompt_tokens = prompt.len(),
        kept_tokens = kept,
        context = usable,
        "the prompt did not fit the context: tokens were cut out of its middle"
    );
    let mut cut = prompt[..KEPT_HEAD_TOKENS].to_vec();
    cut.extend_from_slice(&prompt[tail..]);
    cut
}

/// The generation budget for a prompt of `prompt_len` tokens, or why there is none.
fn resolve_max_tokens(
    prompt_len: usize,
    max_tokens: MaxTokens,
    context_window: Option<usize>,
    prompt_field: Field,
    limits: &RequestLimits,
) -> Result<u32, RequestError> {
    if let MaxTokens::Exactly(0) | MaxTokens::AtMost(0) = max_tokens {
        return Err(RequestError::invalid(Field::MaxTokens, "must be at least 1"));
    }
    if context_window == Some(0) {
        return Err(RequestError::invalid(Field::ContextWindow, "must be at least 1"));
    }
    let ctx = context_window.map_or(limits.max_model_len, |w| w.min(limits.max_model_len));
    // Whole blocks: a request of n tokens holds ceil(n / block_size) of them.
    let pool_tokens = limits.kv_pool_tokens - limits.kv_pool_tokens % limits.block_size.max(1);
    let room = ctx.min(pool_tokens).saturating_sub(prompt_len);
    let context_error = |max: usize| RequestError::ContextLength {
        field: prompt_field,
        prompt: prompt_len,
        max,
        total: prompt_len + max,
        ctx,
    };
    let max = match max_tokens {
        MaxTokens::Exactly(n) => {
            let n = n as usize;
            if prompt_len + n > ctx {
                return Err(context_error(n));
            }
            if prompt_len + n > pool_tokens {
                return Err(RequestError::TooLargeForKvPool {
                    needed: (prompt_len + n).div_ceil(limits.block_size),
                    total: limits.kv_pool_tokens / limits.block_size,
                });
            }
            n
        }
        MaxTokens::AtMost(n) => (n as usize).min(room),
        MaxTokens::Rest => limits.default_max_tokens.map_or(room, |n| n.min(room)),
    };
    if max == 0 {
        return Err(context_error(1));
    }
    Ok(u32::try_from(max).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            model: "test".into(),
            vision: None,
            max_model_len: 100,
            kv_pool_tokens: 64,
            block_size: 16,
            default_max_tokens: None,
            vocab_size: 50,
            eos_token_ids: vec![2],
        }
    }

    #[test]
    fn exact_budget_beyond_the_context_names_the_prompt_field() {
        let e = resolve_max_tokens(90, MaxTokens::Exactly(20), None, Field::Prompt, &limits());
        assert_eq!(
            e,
            Err(RequestError::ContextLength {
                field: Field::Prompt,
                prompt: 90,
                max: 20,
                total: 110,
                ctx: 100
            })
        );
    }

    #[test]
    fn exact_budget_beyond_the_pool_is_a_kv_error() {
        let e = resolve_max_tokens(60, MaxTokens::Exactly(10), None, Field::Messages, &limits());
        assert_eq!(e, Err(RequestError::TooLargeForKvPool { needed: 5, total: 4 }));
    }

    #[test]
    fn at_most_is_cut_to_the_room_left() {
        assert_eq!(
            resolve_max_tokens(10, MaxTokens::AtMost(1000), Some(30), Field::Prompt, &limits()),
            Ok(20)
        );
        assert_eq!(
            resolve_max_tokens(10, MaxTokens::Rest, None, Field::Prompt, &limits()),
            Ok(54)
        );
    }

    #[test]
    fn the_server_default_caps_only_requests_that_set_no_budget() {
        let capped = RequestLimits {
            default_max_tokens: Some(8),
            ..limits()
        };
        let resolve = |max| resolve_max_tokens(10, max, None, Field::Prompt, &capped);
        assert_eq!(resolve(MaxTokens::Rest), Ok(8));
        assert_eq!(resolve(MaxTokens::AtMost(20)), Ok(20));
        assert_eq!(resolve(MaxTokens::Exactly(20)), Ok(20));
        // Near the context's end the room left is the smaller bound.
        assert_eq!(
            resolve_max_tokens(60, MaxTokens::Rest, None, Field::Prompt, &capped),
            Ok(4)
        );
    }

    #[test]
    fn a_full_context_leaves_no_budget() {
        let e = resolve_max_tokens(30, MaxTokens::Rest, Some(30), Field::Prompt, &limits());
        assert!(matches!(e, Err(RequestError::ContextLength { ctx: 30, .. })), "{e:?}");
    }

    #[test]
    fn a_prompt_that_fits_is_not_cut() {
        let prompt: Vec<u32> = (0..63).collect();
        assert_eq!(cut_to_fit(prompt.clone(), MaxTokens::Rest, None, &limits()), prompt);
    }

    #[test]
    fn an_overlong_prompt_keeps_its_head_and_end_and_leaves_the_reply_room() {
        // The pool holds 64 tokens: the reply gets min(budget, 64 / 4).
        let prompt: Vec<u32> = (0..100).collect();
        let cut = cut_to_fit(prompt.clone(), MaxTokens::AtMost(1000), None, &limits());
        let expected: Vec<u32> = (0..4).chain(56..100).collect();
        assert_eq!(cut, expected);
        assert_eq!(
            resolve_max_tokens(cut.len(), MaxTokens::AtMost(1000), None, Field::Messages, &limits()),
            Ok(16)
        );
        let small_budget = cut_to_fit(prompt.clone(), MaxTokens::AtMost(5), None, &limits());
        assert_eq!(small_budget, (0..4).chain(45..100).collect::<Vec<u32>>());
        // A request's own smaller window is what it must fit.
        let window = cut_to_fit(prompt, MaxTokens::Rest, Some(20), &limits());
        assert_eq!(window, (0..4).chain(89..100).collect::<Vec<u32>>());
    }

    #[test]
    fn a_window_too_small_for_head_and_end_is_left_to_the_budget_check() {
        let prompt: Vec<u32> = (0..30).collect();
        assert_eq!(cut_to_fit(prompt.clone(), MaxTokens::Rest, Some(5), &limits()), prompt);
        assert_eq!(cut_to_fit(prompt.clone(), MaxTokens::Rest, Some(0), &limits()), prompt);
    }

    #[test]
    fn zero_budget_is_refused() {
        let e = resolve_max_tokens(1, MaxTokens::Exactly(0), None, Field::Prompt, &limits());
        assert_eq!(e.map_err(|e| e.field()), Err(Some(Field::MaxTokens)));
    }

    #[test]
    fn every_sampling_range_names_its_field() {
        let cases: Vec<(SamplingParams, Field)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                Field::Temperature,
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                Field::Temperature,
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                Field::TopP,
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                Field::MinP,
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                Field::RepetitionPenalty,
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                Field::PresencePenalty,
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                Field::FrequencyPenalty,
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                Field::Logprobs,
            ),
            (
                SamplingParams {
                    logit_bias: vec![(50, 1.0)],
                    ..Default::default()
                },
                Field::LogitBias,
            ),
            (
                SamplingParams {
                    logit_bias: vec![(3, 101.0)],
                    ..Default::default()
                },
                Field::LogitBias,
            ),
        ];
        for (params, field) in cases {
            let e = check_sampling(&params, &limits()).expect_err("out of range");
            assert_eq!(e.field(), Some(field), "{params:?}");
        }
        assert_eq!(check_sampling(&SamplingParams::default(), &limits()), Ok(()));
    }

    #[test]
    fn empty_stop_strings_are_dropped_and_too_many_refused() {
        assert_eq!(check_stops(vec!["".into(), "x".into()]), Ok(vec!["x".to_string()]));
        let many = vec!["s".to_string(); MAX_STOP_STRINGS + 1];
        assert_eq!(check_stops(many).map_err(|e| e.field()), Err(Some(Field::Stop)));
    }

    #[test]
    fn out_of_vocabulary_ids_are_refused() {
        assert_eq!(check_ids(&[1, 49], Field::Prompt, 50), Ok(()));
        assert_eq!(
            check_ids(&[1, 50], Field::Context, 50).map_err(|e| e.field()),
            Err(Some(Field::Context))
        );
    }
}
