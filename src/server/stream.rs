//! Token events → text: incremental detokenization and stop strings, shared by every API
//! encoder (SSE, NDJSON) and by the non-streaming responses, so they cannot diverge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use crate::engine::{EngineError, FinishReason, GenerationStream, Logprobs, TokenEvent, Usage};
use crate::text::{IncrementalDetokenizer, StopMatcher, StopOutcome, TextCodec};

/// A generated token as the encoders see it.
#[derive(Clone, Debug)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// Log-probabilities when requested.
    pub logprobs: Option<Logprobs>,
}

/// One item of a generation as the API encoders consume it.
#[derive(Clone, Debug)]
pub enum StreamItem {
    /// New text and the tokens that produced it (text may be empty while held back).
    Delta {
        /// Text safe to show.
        text: String,
        /// Tokens since the previous delta.
        tokens: Vec<GeneratedToken>,
    },
    /// The generation ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// Token accounting.
        usage: Usage,
    },
    /// The generation failed after it started.
    Error(EngineError),
}

/// Turns a `GenerationStream` into `StreamItem`s.
pub struct TextStream {
    generation: Option<GenerationStream>,
    codec: Arc<TextCodec>,
    detokenizer: IncrementalDetokenizer,
    stop: StopMatcher,
    pending_tokens: Vec<GeneratedToken>,
    queue: VecDeque<StreamItem>,
    usage: Usage,
    timing: LocalTiming,
    done: bool,
    _admission: Option<OwnedSemaphorePermit>,
}

impl TextStream {
    /// Wraps `generation` for a prompt of `prompt` ids, watching for `stop_strings`.
    pub fn new(generation: GenerationStream, codec: Arc<TextCodec>, prompt: &[u32], stop_strings: Vec<String>) -> Self {
        Self {
            generation: Some(generation),
            codec,
            detokenizer: IncrementalDetokenizer::new(prompt),
            stop: StopMatcher::new(stop_strings),
            pending_tokens: Vec::new(),
            queue: VecDeque::new(),
            usage: Usage {
                prompt_tokens: prompt.len() as u32,
                ..Usage::default()
            },
            timing: LocalTiming::new(),
            done: false,
            _admission: None,
        }
    }

    /// Keeps an admission permit until the stream is dropped (the request's server-side life).
    pub fn holding(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._admission = Some(permit);
        self
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
            let event = match self.generation.as_mut() {
                Some(g) => g.recv().await,
                None => return None,
            };
            match event {
                Some(TokenEvent::Scheduled { cached_tokens }) => {
                    self.usage.cached_tokens = cached_tokens;
                    self.timing.scheduled = Some(Instant::now());
                }
                Some(TokenEvent::Token { id, logprobs }) => self.on_token(id, logprobs),
                Some(TokenEvent::Finished { reason, usage }) => self.finish(reason, Some(usage)),
                Some(TokenEvent::Error(e)) => self.fail(e),
                None => self.fail(EngineError::Unavailable),
            }
        }
    }

    fn on_token(&mut self, id: u32, logprobs: Option<Logprobs>) {
        self.usage.completion_tokens += 1;
        self.timing.first_token.get_or_insert_with(Instant::now);
        self.pending_tokens.push(GeneratedToken { id, logprobs });
        let text = self.detokenizer.push(self.codec.tokenizer(), id);
        match self.stop.push(&text) {
            StopOutcome::Emit(text) => {
                if !text.is_empty() {
                    self.push_delta(text);
                }
            }
            StopOutcome::Stop(text) => {
                self.push_delta(text);
                // Dropping the stream tells the engine to free the sequence at its next step.
                self.generation = None;
                let usage = self.timing.apply(self.usage);
                self.finish_with(FinishReason::Stop, usage);
            }
        }
    }

    fn finish(&mut self, reason: FinishReason, usage: Option<Usage>) {
        let mut text = self.detokenizer.flush(self.codec.tokenizer());
        text = match self.stop.push(&text) {
            StopOutcome::Emit(t) => t + &self.stop.flush(),
            StopOutcome::Stop(t) => t,
        };
        if !text.is_empty() || !self.pending_tokens.is_empty() {
            self.push_delta(text);
        }
        let usage = usage.unwrap_or_else(|| self.timing.apply(self.usage));
        self.finish_with(reason, usage);
    }

    fn finish_with(&mut self, reason: FinishReason, usage: Usage) {
        self.queue.push_back(StreamItem::Done { reason, usage });
        self.done = true;
    }

    fn fail(&mut self, e: EngineError) {
        self.queue.push_back(StreamItem::Error(e));
        self.done = true;
    }

    fn push_delta(&mut self, text: String) {
        let tokens = std::mem::take(&mut self.pending_tokens);
        self.queue.push_back(StreamItem::Delta { text, tokens });
    }
}

/// Timestamps seen by the server, for usage when the engine sends no final accounting (the
/// server ended the request itself on a stop string).
struct LocalTiming {
    submitted: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
}

impl LocalTiming {
    fn new() -> Self {
        Self {
            submitted: Instant::now(),
            scheduled: None,
            first_token: None,
        }
    }

    fn apply(&self, mut usage: Usage) -> Usage {
        let now = Instant::now();
        let scheduled = self.scheduled.unwrap_or(self.submitted);
        let first = self.first_token.unwrap_or(now);
        usage.queue_time = scheduled - self.submitted;
        usage.prefill_time = first.saturating_duration_since(scheduled);
        usage.decode_time = now - first;
        usage
    }
}

/// A whole generation folded into one result (non-streaming responses).
#[derive(Debug, Default)]
pub struct Collected {
    /// All text.
    pub text: String,
    /// All tokens.
    pub tokens: Vec<GeneratedToken>,
    /// Why it ended.
    pub reason: Option<FinishReason>,
    /// Accounting.
    pub usage: Usage,
}

/// Drains a `TextStream`; the first error aborts.
pub async fn collect(mut stream: TextStream) -> Result<Collected, EngineError> {
    let mut out = Collected::default();
    while let Some(item) = stream.next().await {
        match item {
            StreamItem::Delta { text, tokens } => {
                out.text.push_str(&text);
                out.tokens.extend(tokens);
            }
            StreamItem::Done { reason, usage } => {
                out.reason = Some(reason);
                out.usage = usage;
            }
            StreamItem::Error(e) => return Err(e),
        }
    }
    Ok(out)
}
