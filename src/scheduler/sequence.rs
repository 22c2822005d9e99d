//! Engine-side state of one request: its tokens and how many of them have KV computed.

use super::kv::block_hash::{extend_block_hashes, BlockHash};
use super::kv::PrefixKeys;
use crate::request::{FinishReason, RequestId};

/// One sequence as the scheduler sees it.
///
/// ```text
///  tokens:  [ prompt ........ | generated ... ]
///            └ num_computed ┘└ still to feed to the model (prefill chunks or the last token)
/// ```
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Request this sequence belongs to.
    pub id: RequestId,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt part of `tokens`.
    pub num_prompt_tokens: usize,
    /// Tokens whose KV is in the cache (reset to 0 by preemption).
    pub num_computed: usize,
    /// Prompt tokens served by the prefix cache at first admission (for usage reporting).
    pub num_cached_prompt_tokens: Option<usize>,
    /// Generation budget.
    pub max_tokens: usize,
    /// Sampled ids that end the sequence with `stop`.
    pub stop_tokens: Vec<u32>,
    /// Chained hashes of every full block of `tokens`.
    pub block_hashes: Vec<BlockHash>,
    /// Salt folded into the first block hash (isolates caches of different models/tenants).
    pub cache_salt: u64,
    /// Whether KV found in the prefix cache may stand in for computing the prompt (not for
    /// embeddings that need every token's hidden state).
    pub reuse_cached_prefix: bool,
    /// Most tokens fed in one step (a prompt is chunked to it even when the step's budget is
    /// larger): bounds what a step computes per token for this sequence (prompt logprobs).
    pub max_chunk: usize,
}

/// What a new sequence is made of.
#[derive(Debug, Clone)]
pub struct SequenceSpec {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Generation budget.
    pub max_tokens: usize,
    /// Sampled ids that end the sequence with `stop`.
    pub stop_tokens: Vec<u32>,
    /// Salt of the first block hash.
    pub cache_salt: u64,
    /// See `Sequence::reuse_cached_prefix`.
    pub reuse_cached_prefix: bool,
    /// See `Sequence::max_chunk` (None: only the step's budget limits it).
    pub max_chunk: Option<usize>,
}

impl Sequence {
    /// A fresh sequence with nothing computed.
    pub fn new(id: RequestId, spec: SequenceSpec, block_size: usize) -> Self {
        let mut block_hashes = Vec::new();
        extend_block_hashes(&mut block_hashes, &spec.prompt, block_size, spec.cache_salt);
        Self {
            id,
            num_prompt_tokens: spec.prompt.len(),
            tokens: spec.prompt,
            num_computed: 0,
            num_cached_prompt_tokens: None,
            max_tokens: spec.max_tokens,
            stop_tokens: spec.stop_tokens,
            block_hashes,
            cache_salt: spec.cache_salt,
            reuse_cached_prefix: spec.reuse_cached_prefix,
            max_chunk: spec.max_chunk.unwrap_or(usize::MAX).max(1),
        }
    }

    /// Its tokens and block hashes as prefix-cache keys.
    pub fn prefix_keys(&self) -> PrefixKeys<'_> {
        PrefixKeys {
            tokens: &self.tokens,
            hashes: &self.block_hashes,
            salt: self.cache_salt,
        }
    }

    /// Tokens generated so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }

    /// The generated tokens.
    pub fn output_tokens(&self) -> &[u32] {
        &self.tokens[self.num_prompt_tokens..]
    }

    /// Appends a sampled token and hashes any block it completes.
    pub fn append(&mut self, token: u32, block_size: usize) {
        self.tokens.push(token);
        extend_block_hashes(&mut self.block_hashes, &self.tokens, block_size, self.cache_salt);
    }

    /// Token-level stop check after a token was appended.
    pub fn check_stop(&self, max_model_len: usize) -> Option<FinishReason> {
        let last = *self.tokens.last()?;
        if self.num_generated() > 0 && self.stop_tokens.contains(&last) {
            Some(FinishReason::Stop)
        } else if self.num_generated() >= self.max_tokens || self.tokens.len() >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}
