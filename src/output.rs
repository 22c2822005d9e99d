//! The token-output stage: engine token events → text, through the incremental detokenizer
//! and the stop strings. Shared by every API encoder (SSE, NDJSON), the non-streaming
//! responses and `mlxd run`, so they cannot diverge.
//!
//! Owner: the task that serves one request. Usage is counted by the engine alone: when a stop
//! string matches, the stream tells the engine how many tokens it kept and reports the usage
//! the engine sends back.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::engine::{EngineError, EngineHandle, GenerationStream, Logprobs, TokenEvent};
use crate::request::{FinishReason, Usage, ValidatedRequest};
use crate::text::tools::ToolCall;
use crate::text::{IncrementalDetokenizer, ReplyParser, ReplyPlan, StopMatcher, StopOutcome, TextCodec};

/// Submits `request` to `engine` and turns its events into text.
pub fn generate(
    engine: &EngineHandle,
    codec: Arc<TextCodec>,
    request: ValidatedRequest,
) -> Result<TextStream, EngineError> {
    let prompt = request.prompt().to_vec();
    let stops = request.stop_strings().to_vec();
    let reply = request.reply().clone();
    let generation = engine.submit(request)?;
    Ok(TextStream::new(generation, codec, &prompt, stops).reading(&reply))
}

/// A generated token as the encoders see it.
#[derive(Clone, Debug)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// Its text in context (SentencePiece's leading space kept): the texts of a generation's
    /// tokens concatenate to its text. Empty for a token that only starts a character.
    pub text: String,
    /// Log-probabilities when requested.
    pub logprobs: Option<Logprobs>,
    /// With logprobs: the text each top alternative would have had in this place.
    pub top_texts: Vec<String>,
}

/// One item of a generation as the API encoders consume it.
#[derive(Clone, Debug)]
pub enum StreamItem {
    /// New text and the tokens that produced it (text may be empty while held back).
    Delta {
        /// Text safe to show (a chat reply's answer text).
        text: String,
        /// A chat reply's new thought text.
        reasoning: String,
        /// Tool calls completed since the previous delta.
        tool_calls: Vec<ToolCall>,
        /// Tokens since the previous delta.
        tokens: Vec<GeneratedToken>,
    },
    /// The generation ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// Token accounting.
        usage: Usage,
        /// The stop string that ended it, if one did.
        stop_sequence: Option<String>,
    },
    /// The generation failed after it started.
    Error(EngineError),
}

/// Turns a `GenerationStream` into `StreamItem`s.
pub struct TextStream {
    generation: GenerationStream,
    codec: Arc<TextCodec>,
    detokenizer: IncrementalDetokenizer,
    stop: StopMatcher,
    /// Splits a chat reply into thoughts, answer and tool calls.
    reply: Option<ReplyParser>,
    /// Special tokens the reply parser must see, with their text.
    shown_specials: Vec<(u32, String)>,
    made_calls: bool,
    pending_tokens: Vec<GeneratedToken>,
    queue: VecDeque<StreamItem>,
    num_tokens: u32,
    /// The engine scheduled the request (it left the queue).
    scheduled: bool,
    /// A stop string matched; tokens that still arrive are past it and dropped.
    stopped: bool,
    /// The stop string that matched.
    stop_sequence: Option<String>,
    /// Prompt tokens read from the prefix cache, once scheduled.
    cached_tokens: u32,
    /// The prompt's ids, and the logprob of each prompt token received so far (by position;
    /// only for requests with prompt logprobs).
    prompt: Vec<u32>,
    prompt_logprobs: Vec<Option<Logprobs>>,
    done: bool,
    /// What the request holds until it is dropped (its admission permit, its model lease).
    _held: Option<Box<dyn std::any::Any + Send>>,
}

impl TextStream {
    /// Wraps `generation` for a prompt of `prompt` ids, watching for `stop_strings`.
    pub fn new(generation: GenerationStream, codec: Arc<TextCodec>, prompt: &[u32], stop_strings: Vec<String>) -> Self {
        Self {
            generation,
            codec,
            detokenizer: IncrementalDetokenizer::new(prompt),
            stop: StopMatcher::new(stop_strings),
            reply: None,
            shown_specials: Vec::new(),
            made_calls: false,
            pending_tokens: Vec::new(),
            queue: VecDeque::new(),
            num_tokens: 0,
            scheduled: false,
            stopped: false,
            stop_sequence: None,
            cached_tokens: 0,
            prompt: prompt.to_vec(),
            prompt_logprobs: Vec::new(),
            done: false,
            _held: None,
        }
    }

    /// Reads the text as a chat reply planned by `plan` (thoughts, tool calls).
    pub fn reading(mut self, plan: &ReplyPlan) -> Self {
        if plan.thoughts.is_some() || plan.tools.is_some() {
            self.reply = Some(ReplyParser::new(plan));
            self.shown_specials = plan.shown_specials.clone();
        }
        self
    }

    /// Keeps `guard` (an admission permit, a lease on the model) until the stream is dropped:
    /// the request's server-side life.
    pub fn holding(mut self, guard: impl Send + 'static) -> Self {
        self._held = Some(Box::new(guard));
        self
    }

    /// Waits until the engine scheduled the request. A failure before that (a queue timeout)
    /// is returned, so a streaming answer can still be an HTTP error status instead of a
    /// stream that starts and fails.
    pub async fn wait_scheduled(&mut self) -> Result<(), EngineError> {
        while !self.scheduled && !self.done {
            self.receive().await;
        }
        if !self.scheduled {
            if let Some(StreamItem::Error(e)) = self.queue.front() {
                let e = e.clone();
                self.queue.clear();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Prompt tokens read from the prefix cache (known once `wait_scheduled` returned), for
    /// APIs that report usage before the first token (Anthropic's `message_start`).
    pub fn cached_tokens(&self) -> u32 {
        self.cached_tokens
    }

    /// Waits until the first token arrived (the prompt is prefilled and its full blocks are in
    /// the prefix cache) or the generation ended; the items stay queued for `next`.
    pub async fn wait_first_token(&mut self) {
        while self.num_tokens == 0 && !self.done {
            self.receive().await;
        }
    }

    /// The prompt's tokens with their logprobs, for a request with prompt logprobs (empty for
    /// others): each token's text as it reads in the prompt; the first token has no logprob
    /// (nothing comes before it). Complete once the first token arrived.
    pub fn prompt_tokens(&self) -> Vec<GeneratedToken> {
        if self.prompt_logprobs.is_empty() {
            return Vec::new();
        }
        let tokenizer = self.codec.tokenizer();
        let mut detokenizer = IncrementalDetokenizer::new(&[]);
        self.prompt
            .iter()
            .zip(&self.prompt_logprobs)
            .map(|(&id, logprobs)| {
                let top_texts = logprobs.as_ref().map_or_else(Vec::new, |lp| {
                    lp.top
                        .iter()
                        .map(|alt| detokenizer.clone().push(tokenizer, alt.id))
                        .collect()
                });
                GeneratedToken {
                    id,
                    text: detokenizer.push(tokenizer, id),
                    logprobs: logprobs.clone(),
                    top_texts,
                }
            })
            .collect()
    }

    /// The next item; None after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            self.receive().await;
        }
    }

    /// Receives and processes one engine event.
    async fn receive(&mut self) {
        match self.generation.recv().await {
            Some(TokenEvent::Scheduled { cached_tokens }) => {
                self.scheduled = true;
                self.cached_tokens = cached_tokens;
            }
            Some(TokenEvent::PromptLogprobs { first, logprobs }) => {
                self.prompt_logprobs.resize(self.prompt.len(), None);
                for (i, lp) in logprobs.into_iter().enumerate() {
                    if let Some(slot) = self.prompt_logprobs.get_mut(first + i) {
                        *slot = Some(lp);
                    }
                }
            }
            Some(TokenEvent::Token { .. }) if self.stopped => {}
            Some(TokenEvent::Token { id, logprobs }) => self.on_token(id, logprobs),
            Some(TokenEvent::Finished { reason, usage }) => self.finish(reason, usage),
            // Only embedding requests get vectors; they never come through a text stream.
            Some(TokenEvent::Embedding(_)) => {}
            Some(TokenEvent::Error(e)) => self.fail(e),
            None => self.fail(EngineError::Unavailable),
        }
    }

    fn on_token(&mut self, id: u32, logprobs: Option<Logprobs>) {
        self.num_tokens += 1;
        let tokenizer = self.codec.tokenizer();
        let top_texts = logprobs.as_ref().map_or_else(Vec::new, |lp| {
            lp.top
                .iter()
                .map(|alt| self.detokenizer.clone().push(tokenizer, alt.id))
                .collect()
        });
        let mut text = self.detokenizer.push(tokenizer, id);
        if let Some((_, shown)) = self.shown_specials.iter().find(|(s, _)| *s == id) {
            text.push_str(shown);
        }
        self.pending_tokens.push(GeneratedToken {
            id,
            text: text.clone(),
            logprobs,
            top_texts,
        });
        match self.stop.push(&text) {
            StopOutcome::Emit(text) => {
                if !text.is_empty() {
                    self.push_delta(text);
                }
            }
            StopOutcome::Stop { before, matched } => {
                self.push_delta(before);
                self.stop_sequence = Some(matched);
                self.stop_here();
            }
        }
    }

    /// Ends the generation at the tokens received so far: the engine finishes the request
    /// with `stop` and sends the usage.
    fn stop_here(&mut self) {
        self.stopped = true;
        self.generation.stop(self.num_tokens);
    }

    fn finish(&mut self, mut reason: FinishReason, usage: Usage) {
        self.done = true;
        if !self.stopped {
            let mut text = self.detokenizer.flush(self.codec.tokenizer());
            text = match self.stop.push(&text) {
                StopOutcome::Emit(t) => t + &self.stop.flush(),
                StopOutcome::Stop { before, matched } => {
                    reason = FinishReason::Stop;
                    self.stop_sequence = Some(matched);
                    before
                }
            };
            if !text.is_empty() || !self.pending_tokens.is_empty() {
                self.push_delta(text);
            }
        }
        if let Some(parser) = &mut self.reply {
            let rest = parser.finish();
            self.made_calls |= !rest.tool_calls.is_empty();
            let tokens = std::mem::take(&mut self.pending_tokens);
            if !(rest.content.is_empty()
                && rest.reasoning.is_empty()
                && rest.tool_calls.is_empty()
                && tokens.is_empty())
            {
                self.queue.push_back(StreamItem::Delta {
                    text: rest.content,
                    reasoning: rest.reasoning,
                    tool_calls: rest.tool_calls,
                    tokens,
                });
            }
        }
        if self.made_calls && reason == FinishReason::Stop {
            reason = FinishReason::ToolCalls;
        }
        self.queue.push_back(StreamItem::Done {
            reason,
            usage,
            stop_sequence: self.stop_sequence.take(),
        });
        self.done = true;
    }

    fn fail(&mut self, e: EngineError) {
        self.queue.push_back(StreamItem::Error(e));
        self.done = true;
    }

    /// Queues `text` (through the reply parser, when there is one) with the tokens since the
    /// last delta.
    fn push_delta(&mut self, text: String) {
        let tokens = std::mem::take(&mut self.pending_tokens);
        let Some(parser) = &mut self.reply else {
            self.queue.push_back(StreamItem::Delta {
                text,
                reasoning: String::new(),
                tool_calls: Vec::new(),
                tokens,
            });
            return;
        };
        let delta = parser.push(&text);
        if delta.content.is_empty() && delta.reasoning.is_empty() && delta.tool_calls.is_empty() && !delta.done {
            // All held back (a possible tag or call): the tokens go with the next delta.
            self.pending_tokens = tokens;
            return;
        }
        self.made_calls |= !delta.tool_calls.is_empty();
        self.queue.push_back(StreamItem::Delta {
            text: delta.content,
            reasoning: delta.reasoning,
            tool_calls: delta.tool_calls,
            tokens,
        });
        if delta.done && !self.stopped && !self.done {
            self.stop_here();
        }
    }
}

/// A whole generation folded into one result (non-streaming responses).
#[derive(Debug, Default)]
pub struct Collected {
    /// All text (a chat reply's answer).
    pub text: String,
    /// A chat reply's thought.
    pub reasoning: String,
    /// A chat reply's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// All tokens.
    pub tokens: Vec<GeneratedToken>,
    /// Why it ended.
    pub reason: Option<FinishReason>,
    /// The stop string that ended it, if one did.
    pub stop_sequence: Option<String>,
    /// Accounting.
    pub usage: Usage,
    /// The prompt's tokens with their logprobs (requests with prompt logprobs; see
    /// `TextStream::prompt_tokens`).
    pub prompt_tokens: Vec<GeneratedToken>,
}

/// Drains a `TextStream`; the first error aborts.
pub async fn collect(mut stream: TextStream) -> Result<Collected, EngineError> {
    let mut out = Collected::default();
    while let Some(item) = stream.next().await {
        match item {
            StreamItem::Delta {
                text,
                reasoning,
                tool_calls,
                tokens,
            } => {
                out.text.push_str(&text);
                out.reasoning.push_str(&reasoning);
                out.tool_calls.extend(tool_calls);
                out.tokens.extend(tokens);
            }
            StreamItem::Done {
                reason,
                usage,
                stop_sequence,
            } => {
                out.reason = Some(reason);
                out.usage = usage;
                out.stop_sequence = stop_sequence;
            }
            StreamItem::Error(e) => return Err(e),
        }
    }
    out.prompt_tokens = stream.prompt_tokens();
    Ok(out)
}

/// One input's embedding.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The pooled, L2-normalised vector.
    pub vector: Vec<f32>,
    /// Token accounting (prompt tokens; cached ones from the prefix cache).
    pub usage: Usage,
}

/// Submits an embedding request and waits for its vector; `permit` is held until it is done.
pub async fn embed(
    engine: &EngineHandle,
    request: ValidatedRequest,
    permit: OwnedSemaphorePermit,
) -> Result<Embedding, EngineError> {
    let _permit = permit;
    let mut events = engine.submit(request)?;
    let mut vector = None;
    loop {
        match events.recv().await {
            Some(TokenEvent::Embedding(v)) => vector = Some(v),
            Some(TokenEvent::Finished { usage, .. }) => {
                let vector = vector.ok_or_else(|| EngineError::StepFailed("no embedding was computed".into()))?;
                return Ok(Embedding { vector, usage });
            }
            Some(TokenEvent::Error(e)) => return Err(e),
            Some(TokenEvent::Scheduled { .. } | TokenEvent::Token { .. } | TokenEvent::PromptLogprobs { .. }) => {}
            None => return Err(EngineError::Unavailable),
        }
    }
}
