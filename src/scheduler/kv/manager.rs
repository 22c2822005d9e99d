//! Per-sequence block tables on top of the `BlockPool`: prefix lookup, slot allocation, freeing.
//!
//! Follows vLLM v1's `KVCacheManager`. A sequence's table maps token position `p` to slot
//! `table[p / block_size] * block_size + p % block_size`:
//!
//! ```text
//!  tokens:  [ 0 .. 15 ][ 16 .. 31 ][ 32 .. 40 ·····]
//!  table:   [ blk 7   ][ blk 3    ][ blk 9         ]   ← last block partly filled
//!            cached ───────────────┘ (prefix hit)  └── new blocks from allocate_slots
//! ```

use std::collections::HashMap;

use super::block_hash::{hash_block_tokens, BlockHash};
use super::block_pool::{BlockId, BlockPool};
use crate::request::RequestId;

/// A sequence's token ids with their full blocks' chained hashes: the prefix cache's keys.
#[derive(Clone, Copy, Debug)]
pub struct PrefixKeys<'a> {
    /// Every token of the sequence.
    pub tokens: &'a [u32],
    /// Hashes of its full blocks (`extend_block_hashes`).
    pub hashes: &'a [BlockHash],
    /// The salt of its first block's hash.
    pub salt: u64,
}

/// What a new sequence finds in the prefix cache: whole blocks, then possibly one free cached
/// block whose leading slots hold its next tokens (`tail`: the block and how many).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Cached blocks of the leading whole blocks, shared.
    pub blocks: Vec<BlockId>,
    /// A free block taken over for its first `n` slots; its other slots get overwritten.
    pub tail: Option<(BlockId, usize)>,
}

impl PrefixHit {
    /// Tokens the hit covers.
    pub fn num_tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size + self.tail.map_or(0, |(_, n)| n)
    }
}

/// Not enough free blocks for an allocation; the caller preempts or waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFreeBlocks;

#[derive(Debug, Default)]
struct BlockTable {
    blocks: Vec<BlockId>,
    /// Leading blocks already registered in the prefix cache.
    num_registered: usize,
}

/// Owns the pool and every sequence's block table.
#[derive(Debug)]
pub struct BlockManager {
    pool: BlockPool,
    block_size: usize,
    enable_prefix_cache: bool,
    tables: HashMap<RequestId, BlockTable>,
    /// Blocks newly registered in the prefix cache since the owner last took them (for a
    /// disk cache that writes every cached block through).
    newly_cached: Option<Vec<(BlockId, BlockHash)>>,
    /// Leading parts of cached blocks: the hash of (parent, first k tokens), k < block size,
    /// to the block and its full hash (valid while the pool still caches it under that hash).
    partial: HashMap<BlockHash, (BlockId, BlockHash)>,
    /// The partial keys each block was last registered under, to drop when it is registered
    /// again (bounds `partial` by the pool's size).
    partial_keys: HashMap<BlockId, Vec<BlockHash>>,
}

impl BlockManager {
    /// A manager over `num_blocks` blocks (including the null block) of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_cache: bool) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            enable_prefix_cache,
            tables: HashMap::new(),
            newly_cached: None,
            partial: HashMap::new(),
            partial_keys: HashMap::new(),
        }
    }

    /// Starts recording the blocks newly registered in the prefix cache (see
    /// `take_newly_cached`).
    pub fn record_newly_cached(&mut self) {
        self.newly_cached.get_or_insert_with(Vec::new);
    }

    /// The blocks registered in the prefix cache since the last call, with their hashes.
    pub fn take_newly_cached(&mut self) -> Vec<(BlockId, BlockHash)> {
        self.newly_cached.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Takes a free block for content `h` read from elsewhere (the disk cache), lets `fill`
    /// write it, and on success registers it in the prefix cache, free and most recently used:
    /// the next lookup finds it. False when `h` is cached already, no block is free, or
    /// `fill` failed (the block then goes back unhashed).
    pub fn adopt_cached(&mut self, h: BlockHash, fill: impl FnOnce(BlockId) -> bool) -> bool {
        if !self.enable_prefix_cache || self.pool.lookup(h).is_some() {
            return false;
        }
        let Some(id) = self.pool.allocate(1).and_then(|mut ids| ids.pop()) else {
            return false;
        };
        let filled = fill(id);
        if filled {
            self.pool.register_full(id, h);
        }
        self.pool.release([id]);
        filled
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Read access to the pool (stats and invariant checks).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached blocks matching `hashes`, never covering the last token
    /// (`[INV_LOGITS_TOKEN]`: the last prompt token must be computed to produce logits).
    pub fn find_cached_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.enable_prefix_cache || num_tokens == 0 {
            return Vec::new();
        }
        let max_blocks = (num_tokens - 1) / self.block_size;
        hashes
            .iter()
            .take(max_blocks)
            .map_while(|h| self.pool.lookup(*h))
            .collect()
    }

    /// Everything `keys` finds cached: `find_cached_prefix`, then, where the next whole block
    /// is not cached, the free cached block (same parent) sharing the most leading tokens with
    /// the rest of the sequence. Never covers the last token.
    pub fn find_prefix_hit(&self, keys: PrefixKeys) -> PrefixHit {
        let blocks = self.find_cached_prefix(keys.hashes, keys.tokens.len());
        let start = blocks.len() * self.block_size;
        let rest = keys.tokens.len().saturating_sub(start + 1).min(self.block_size - 1);
        let parent = blocks.len().checked_sub(1).map(|i| keys.hashes[i]);
        let tail = (1..=rest).rev().find_map(|n| {
            let h = hash_block_tokens(parent, &keys.tokens[start..start + n], keys.salt);
            let &(block, full) = self.partial.get(&h)?;
            let usable = self.pool.lookup(full) == Some(block) && self.pool.ref_count(block) == 0;
            usable.then_some((block, n))
        });
        PrefixHit { blocks, tail }
    }

    /// Makes the table of `id` cover `num_total_tokens` tokens. A sequence without a table first
    /// takes `hit` (from `find_prefix_hit`). All or nothing.
    pub fn allocate_slots(
        &mut self,
        id: RequestId,
        num_total_tokens: usize,
        hit: &PrefixHit,
    ) -> Result<(), NoFreeBlocks> {
        let have = self.tables.get(&id).map_or(0, |t| t.blocks.len());
        let (cached, tail) = match have {
            0 => (hit.blocks.as_slice(), hit.tail.map(|(block, _)| block)),
            _ => (&[][..], None),
        };
        let need_total = self.blocks_for(num_total_tokens);
        let num_new = need_total.saturating_sub(have + cached.len() + usize::from(tail.is_some()));
        // Cached blocks sitting in the free queue stop being free once touched; so does the tail.
        let num_cached_free = cached.iter().filter(|b| self.pool.ref_count(**b) == 0).count();
        if num_new + num_cached_free + usize::from(tail.is_some()) > self.pool.num_free() {
            return Err(NoFreeBlocks);
        }
        self.pool.touch(cached);
        if let Some(block) = tail {
            assert!(
                self.pool.take_free(block),
                "invariant: a prefix hit's tail block is free"
            );
        }
        let fresh = self
            .pool
            .allocate(num_new)
            .expect("invariant: free count was checked above");
        let table = self.tables.entry(id).or_default();
        if have == 0 {
            table.num_registered = cached.len();
        }
        table.blocks.extend_from_slice(cached);
        table.blocks.extend(tail);
        table.blocks.extend(fresh);
        Ok(())
    }

    /// Registers the sequence's full blocks whose KV is now computed (`num_computed` tokens),
    /// each also under its leading parts (for `find_prefix_hit`'s tail).
    pub fn register_computed(&mut self, id: RequestId, keys: PrefixKeys, num_computed: usize) {
        if !self.enable_prefix_cache {
            return;
        }
        let Some(table) = self.tables.get_mut(&id) else {
            return;
        };
        let num_full = (num_computed / self.block_size)
            .min(keys.hashes.len())
            .min(table.blocks.len());
        let newly_full = table.num_registered..num_full.max(table.num_registered);
        let blocks: Vec<(usize, BlockId)> = newly_full
            .clone()
            .zip(table.blocks[newly_full].iter().copied())
            .collect();
        table.num_registered = table.num_registered.max(num_full);
        for (i, block) in blocks {
            if self.pool.register_full(block, keys.hashes[i]) {
                if let Some(new) = &mut self.newly_cached {
                    new.push((block, keys.hashes[i]));
                }
                self.register_parts(block, keys, i);
            }
        }
    }

    /// Keys `block`, just cached as block `index` of `keys`, under the hash of each of its
    /// leading parts.
    fn register_parts(&mut self, block: BlockId, keys: PrefixKeys, index: usize) {
        for old in self.partial_keys.remove(&block).unwrap_or_default() {
            if self.partial.get(&old).is_some_and(|&(b, _)| b == block) {
                self.partial.remove(&old);
            }
        }
        let parent = index.checked_sub(1).map(|p| keys.hashes[p]);
        let tokens = &keys.tokens[index * self.block_size..(index + 1) * self.block_size];
        let parts: Vec<BlockHash> = (1..tokens.len())
            .map(|n| hash_block_tokens(parent, &tokens[..n], keys.salt))
            .collect();
        for &part in &parts {
            self.partial.insert(part, (block, keys.hashes[index]));
        }
        self.partial_keys.insert(block, parts);
    }

    /// Releases every block of `id`, last block first so the tail is evicted before the prefix.
    pub fn free(&mut self, id: RequestId) {
        if let Some(table) = self.tables.remove(&id) {
            self.pool.release(table.blocks.into_iter().rev());
        }
    }

    /// The block table of `id` (empty if it has none).
    pub fn table(&self, id: RequestId) -> &[BlockId] {
        self.tables.get(&id).map_or(&[], |t| &t.blocks)
    }

    /// Iterates all (sequence, table) pairs (invariant checks).
    pub fn tables(&self) -> impl Iterator<Item = (RequestId, &[BlockId])> {
        self.tables.iter().map(|(id, t)| (*id, t.blocks.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::kv::block_hash::extend_block_hashes;

    /// Prefix keys of `tokens` (salt 0) with blocks of `block_size`.
    fn hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut h = Vec::new();
        extend_block_hashes(&mut h, tokens, block_size, 0);
        h
    }

    fn keys<'a>(tokens: &'a [u32], hashes: &'a [BlockHash]) -> PrefixKeys<'a> {
        PrefixKeys {
            tokens,
            hashes,
            salt: 0,
        }
    }

    const NONE: PrefixHit = PrefixHit {
        blocks: Vec::new(),
        tail: None,
    };

    #[test]
    fn prefix_hit_never_covers_last_token() {
        let mut m = BlockManager::new(10, 4, true);
        let tokens: Vec<u32> = (0..8).collect();
        let hs = hashes(&tokens, 4);
        let (h0, h1) = (hs[0], hs[1]);
        let a = RequestId(1);
        m.allocate_slots(a, 8, &NONE).expect("blocks");
        m.register_computed(a, keys(&tokens, &hs), 8);
        // Exactly 8 tokens: only the first block may be reused.
        assert_eq!(m.find_cached_prefix(&[h0, h1], 8).len(), 1);
        assert_eq!(m.find_cached_prefix(&[h0, h1], 9).len(), 2);
    }

    #[test]
    fn blocks_from_elsewhere_are_adopted_into_the_prefix_cache() {
        let mut m = BlockManager::new(4, 4, true);
        m.record_newly_cached();
        let h = hash_block_tokens(None, &[1, 2, 3, 4], 0);
        assert!(!m.adopt_cached(h, |_| false), "a failed fill is not cached");
        assert!(m.find_cached_prefix(&[h], 5).is_empty());
        let mut filled = None;
        assert!(m.adopt_cached(h, |b| {
            filled = Some(b);
            true
        }));
        assert_eq!(m.find_cached_prefix(&[h], 5), vec![filled.expect("filled")]);
        assert_eq!(m.pool().num_free(), 3, "adopted blocks stay free (evictable)");
        assert!(!m.adopt_cached(h, |_| true), "already cached");
        // Blocks computed here are recorded for the disk tier; adopted ones are not.
        let a = RequestId(1);
        m.allocate_slots(a, 9, &NONE).expect("blocks");
        let tokens = [5, 6, 7, 8, 9];
        let hs = hashes(&tokens, 4);
        let h2 = hs[0];
        m.register_computed(a, keys(&tokens, &hs), 9);
        assert_eq!(m.take_newly_cached(), vec![(m.table(a)[0], h2)]);
        assert!(m.take_newly_cached().is_empty());
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = BlockManager::new(4, 4, true);
        let a = RequestId(1);
        assert_eq!(m.allocate_slots(a, 16, &NONE), Err(NoFreeBlocks));
        assert!(m.table(a).is_empty());
        m.allocate_slots(a, 12, &NONE).expect("blocks");
        assert_eq!(m.table(a).len(), 3);
        assert_eq!(m.pool().num_free(), 0);
        m.free(a);
        assert_eq!(m.pool().num_free(), 3);
    }

    #[test]
    fn shared_prefix_is_ref_counted() {
        let mut m = BlockManager::new(8, 4, true);
        let tokens = [1, 2, 3, 4, 5, 6];
        let hs = hashes(&tokens, 4);
        let (a, b) = (RequestId(1), RequestId(2));
        m.allocate_slots(a, 5, &NONE).expect("blocks");
        m.register_computed(a, keys(&tokens[..5], &hs), 5);
        let hit = m.find_prefix_hit(keys(&tokens, &hs));
        assert_eq!(hit.blocks, vec![m.table(a)[0]]);
        assert_eq!(hit.tail, None, "a's second block is not full, so not cached");
        m.allocate_slots(b, 6, &hit).expect("blocks");
        assert_eq!(m.pool().ref_count(hit.blocks[0]), 2);
        m.free(a);
        m.free(b);
        assert_eq!(m.pool().num_free(), 7);
        assert_eq!(m.pool().lookup(hs[0]), Some(hit.blocks[0]));
    }

    #[test]
    fn a_free_cached_block_sharing_leading_tokens_is_taken_over() {
        let mut m = BlockManager::new(8, 4, true);
        // a computed two full blocks [0 1 2 3][4 5 6 7] and finished.
        let a_tokens: Vec<u32> = (0..8).collect();
        let a_hashes = hashes(&a_tokens, 4);
        let a = RequestId(1);
        m.allocate_slots(a, 8, &NONE).expect("blocks");
        m.register_computed(a, keys(&a_tokens, &a_hashes), 8);
        let (first, second) = (m.table(a)[0], m.table(a)[1]);
        m.free(a);
        // b shares block 0 and the first two tokens of block 1, then differs.
        let b_tokens = [0, 1, 2, 3, 4, 5, 99];
        let b_hashes = hashes(&b_tokens, 4);
        let hit = m.find_prefix_hit(keys(&b_tokens, &b_hashes));
        assert_eq!(
            hit,
            PrefixHit {
                blocks: vec![first],
                tail: Some((second, 2))
            }
        );
        assert_eq!(hit.num_tokens(4), 6);
        let b = RequestId(2);
        m.allocate_slots(b, 7, &hit).expect("blocks");
        assert_eq!(m.table(b), &[first, second][..]);
        assert_eq!(m.pool().ref_count(second), 1);
        assert_eq!(m.pool().block_hash(second), None, "b overwrites it: no longer cached");
        assert_eq!(m.pool().lookup(a_hashes[1]), None);
        assert_eq!(m.pool().num_free(), 5);
        // The same tokens as a: the tail never covers the last token (3 of 4 reused).
        let c = RequestId(3);
        m.free(b);
        m.allocate_slots(c, 8, &NONE).expect("blocks");
        m.register_computed(c, keys(&a_tokens, &a_hashes), 8);
        let c_second = m.table(c)[1];
        m.free(c);
        let hit = m.find_prefix_hit(keys(&a_tokens, &a_hashes));
        assert_eq!(hit.tail, Some((c_second, 3)));
    }

    #[test]
    fn a_tail_in_use_or_evicted_is_not_offered() {
        let mut m = BlockManager::new(3, 2, true);
        let tokens = [7, 8, 9, 10];
        let hs = hashes(&tokens, 2);
        let a = RequestId(1);
        m.allocate_slots(a, 4, &NONE).expect("blocks");
        m.register_computed(a, keys(&tokens, &hs), 4);
        // Block 1 ([9 10]) is in use by a: not offered as a tail.
        let probe = [7, 8, 9, 11];
        let probe_hashes = hashes(&probe, 2);
        assert_eq!(m.find_prefix_hit(keys(&probe, &probe_hashes)).tail, None);
        m.free(a);
        assert!(m.find_prefix_hit(keys(&probe, &probe_hashes)).tail.is_some());
        // Both blocks handed out again (evicted): nothing is offered.
        let b = RequestId(2);
        m.allocate_slots(b, 4, &NONE).expect("blocks");
        m.free(b);
        assert_eq!(m.find_prefix_hit(keys(&probe, &probe_hashes)), NONE);
    }
}
