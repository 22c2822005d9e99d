//! Incremental detokenization that never splits a multi-byte character.
//!
//! Follows the offsets scheme of TGI/vLLM: decode a small window of recent ids twice (with and
//! without the new ones) and emit the difference once it no longer ends in U+FFFD (a byte-level
//! or byte-fallback token that only completes a character together with later tokens). Decoding
//! a window rather than single ids keeps the spaces that SentencePiece-style decoders strip from
//! the first token of a string.

use tokenizers::Tokenizer;

/// Prompt tokens kept as left context so the first generated token decodes as a continuation.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Per-sequence detokenizer state.
#[derive(Clone, Debug)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt` (its last few tokens give the first output its leading space).
    pub fn new(prompt: &[u32]) -> Self {
        let start = prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = prompt[start..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
        }
    }

    /// Adds one generated id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = full.get(prefix.len()..) else {
            return String::new();
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        delta
    }

    /// Text of ids still held back (an incomplete character at the end of generation), decoded
    /// as is, replacement characters included, since no more bytes will come.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tokenizer, &self.ids[self.prefix_offset..]);
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or_default().to_string()
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap_or_default()
}
