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

use super::block_hash::BlockHash;
use super::block_pool::{BlockId, BlockPool};
use crate::request::RequestId;

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

    /// Makes the table of `id` cover `num_total_tokens` tokens. A sequence without a table first
    /// takes `cached` (a prefix hit from `find_cached_prefix`). All or nothing.
    pub fn allocate_slots(
        &mut self,
        id: RequestId,
        num_total_tokens: usize,
        cached: &[BlockId],
    ) -> Result<(), NoFreeBlocks> {
        let have = self.tables.get(&id).map_or(0, |t| t.blocks.len());
        let cached = if have == 0 { cached } else { &[] };
        let need_total = self.blocks_for(num_total_tokens);
        let num_new = need_total.saturating_sub(have + cached.len());
        // Cached blocks sitting in the free queue stop being free once touched.
        let num_cached_free = cached.iter().filter(|b| self.pool.ref_count(**b) == 0).count();
        if num_new + num_cached_free > self.pool.num_free() {
            return Err(NoFreeBlocks);
        }
        self.pool.touch(cached);
        let fresh = self
            .pool
            .allocate(num_new)
            .expect("invariant: free count was checked above");
        let table = self.tables.entry(id).or_default();
        if have == 0 {
            table.num_registered = cached.len();
        }
        table.blocks.extend_from_slice(cached);
        table.blocks.extend(fresh);
        Ok(())
    }

    /// Registers the sequence's full blocks whose KV is now computed (`num_computed` tokens).
    pub fn register_computed(&mut self, id: RequestId, hashes: &[BlockHash], num_computed: usize) {
        if !self.enable_prefix_cache {
            return;
        }
        let Some(table) = self.tables.get_mut(&id) else {
            return;
        };
        let num_full = (num_computed / self.block_size)
            .min(hashes.len())
            .min(table.blocks.len());
        let newly_full = table.num_registered..num_full.max(table.num_registered);
        for (block, hash) in table.blocks[newly_full.clone()].iter().zip(&hashes[newly_full]) {
            if self.pool.register_full(*block, *hash) {
                if let Some(new) = &mut self.newly_cached {
                    new.push((*block, *hash));
                }
            }
        }
        table.num_registered = table.num_registered.max(num_full);
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
    use crate::scheduler::kv::block_hash::hash_block_tokens;

    #[test]
    fn prefix_hit_never_covers_last_token() {
        let mut m = BlockManager::new(10, 4, true);
        let tokens: Vec<u32> = (0..8).collect();
        let h0 = hash_block_tokens(None, &tokens[..4], 0);
        let h1 = hash_block_tokens(Some(h0), &tokens[4..8], 0);
        let a = RequestId(1);
        m.allocate_slots(a, 8, &[]).expect("blocks");
        m.register_computed(a, &[h0, h1], 8);
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
        m.allocate_slots(a, 9, &[]).expect("blocks");
        let h2 = hash_block_tokens(None, &[5, 6, 7, 8], 0);
        m.register_computed(a, &[h2], 9);
        assert_eq!(m.take_newly_cached(), vec![(m.table(a)[0], h2)]);
        assert!(m.take_newly_cached().is_empty());
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = BlockManager::new(4, 4, true);
        let a = RequestId(1);
        assert_eq!(m.allocate_slots(a, 16, &[]), Err(NoFreeBlocks));
        assert!(m.table(a).is_empty());
        m.allocate_slots(a, 12, &[]).expect("blocks");
        assert_eq!(m.table(a).len(), 3);
        assert_eq!(m.pool().num_free(), 0);
        m.free(a);
        assert_eq!(m.pool().num_free(), 3);
    }

    #[test]
    fn shared_prefix_is_ref_counted() {
        let mut m = BlockManager::new(8, 4, true);
        let h = hash_block_tokens(None, &[1, 2, 3, 4], 0);
        let (a, b) = (RequestId(1), RequestId(2));
        m.allocate_slots(a, 5, &[]).expect("blocks");
        m.register_computed(a, &[h], 5);
        let hit = m.find_cached_prefix(&[h], 6);
        assert_eq!(hit, vec![m.table(a)[0]]);
        m.allocate_slots(b, 6, &hit).expect("blocks");
        assert_eq!(m.pool().ref_count(hit[0]), 2);
        m.free(a);
        m.free(b);
        assert_eq!(m.pool().num_free(), 7);
        assert_eq!(m.pool().lookup(h), Some(hit[0]));
    }
}
