//! Engine-side state of one request: its tokens and how many of them have KV computed.

use super::kv::block_hash::{extend_block_hashes, BlockHash};
use super::kv::PrefixKeys;
use crate::request::{FinishReason, ImageSpan, RequestId};

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
    /// The prompt's images: where their soft tokens sit (a chunk never ends inside one).
    pub images: Vec<ImageSpan>,
    /// `tokens` as prefix-cache keys when the prompt has images: each soft token replaced by
    /// a key of its image's content and place, so that only the same image shares KV.
    key_tokens: Option<Vec<u32>>,
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
    /// See `Sequence::images`.
    pub images: Vec<ImageSpan>,
}

/// `prompt` with each image's soft tokens replaced by keys of the image's digest and the
/// token's place in it (see `Sequence::key_tokens`).
fn image_keys(prompt: &[u32], images: &[ImageSpan]) -> Vec<u32> {
    let mut keys = prompt.to_vec();
    for image in images {
        for (i, key) in keys[image.start..image.end()].iter_mut().enumerate() {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&image.digest.to_le_bytes());
            bytes[8..].copy_from_slice(&(i as u64).to_le_bytes());
            *key = xxhash_rust::xxh3::xxh3_64(&bytes) as u32;
        }
    }
    keys
}

impl Sequence {
    /// A fresh sequence with nothing computed.
    pub fn new(id: RequestId, spec: SequenceSpec, block_size: usize) -> Self {
        let key_tokens = (!spec.images.is_empty()).then(|| image_keys(&spec.prompt, &spec.images));
        let mut block_hashes = Vec::new();
        let keys = key_tokens.as_deref().unwrap_or(&spec.prompt);
        extend_block_hashes(&mut block_hashes, keys, block_size, spec.cache_salt);
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
            images: spec.images,
            key_tokens,
        }
    }

    /// Its tokens and block hashes as prefix-cache keys.
    pub fn prefix_keys(&self) -> PrefixKeys<'_> {
        PrefixKeys {
            tokens: self.key_tokens.as_deref().unwrap_or(&self.tokens),
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
        if let Some(keys) = &mut self.key_tokens {
            keys.push(token);
        }
        let keys = self.key_tokens.as_deref().unwrap_or(&self.tokens);
        extend_block_hashes(&mut self.block_hashes, keys, block_size, self.cache_salt);
    }

    /// Where a chunk starting at `from` may end when it would end at `end`: never inside an
    /// image, whose soft tokens attend to each other and so are computed in one step. Before
    /// an image it stops at the image's start; from inside one (a cached prefix may end
    /// there) it runs to the image's end, past `end` if need be.
    pub fn chunk_end(&self, from: usize, end: usize) -> usize {
        let mut end = end;
        for image in &self.images {
            if image.start < end && end < image.end() {
                end = if image.start > from { image.start } else { image.end() };
            }
        }
        end
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
