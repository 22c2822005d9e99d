//! The fixed pool of KV blocks: ref counts, an LRU free queue and the hash → block map.
//!
//! Follows vLLM v1's `BlockPool`/`FreeKVCacheBlockQueue`. Invariants:
//! - block 0 is the null block (padding in block tables); it is never handed out;
//! - a block is in the free queue iff its ref count is 0;
//! - a free block keeps its hash (a prefix-cache entry) until it is handed out again, and
//!   blocks are handed out from the head of the queue: freed cached blocks join the tail (the
//!   least recently freed go first), freed blocks without a hash the head (they hold nothing
//!   reusable, so they go before any cached block, and memory already touched is reused);
//! - `cached[h] == id` implies `blocks[id].hash == Some(h)`.

use std::collections::HashMap;

use super::block_hash::BlockHash;

/// Index of one KV block in the pool (and in the KV tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct BlockMeta {
    ref_count: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
}

/// All KV blocks of the engine, with ref counting and prefix-cache registration.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks, block 0 reserved as the null block.
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks >= 2, "a KV pool needs the null block and at least one more");
        let mut pool = Self {
            blocks: vec![
                BlockMeta {
                    ref_count: 0,
                    hash: None,
                    prev: NIL,
                    next: NIL,
                };
                num_blocks
            ],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
        };
        // The null block is permanently "in use" so it never enters the free queue.
        pool.blocks[0].ref_count = 1;
        for id in 1..num_blocks as u32 {
            pool.push_tail(id);
        }
        pool
    }

    /// Blocks that can be handed out (including free blocks that still hold a cached hash).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Usable blocks in the pool (excluding the null block).
    pub fn num_total(&self) -> usize {
        self.blocks.len() - 1
    }

    /// Current ref count of a block (for invariant checks and tests).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id.0 as usize].ref_count
    }

    /// The hash a block is registered under, if any.
    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        self.blocks[id.0 as usize].hash
    }

    /// Free blocks from the next to be handed out to the last (for exact-state tests).
    pub fn free_order(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.head;
        while cur != NIL {
            out.push(BlockId(cur));
            cur = self.blocks[cur as usize].next;
        }
        out
    }

    /// Hands out `n` blocks from the LRU head with ref count 1, evicting their stale hashes;
    /// None (and no change) when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.hand_out(id);
            out.push(BlockId(id));
        }
        Some(out)
    }

    /// The cached block holding exactly the prefix hashed as `h`, if any.
    pub fn lookup(&self, h: BlockHash) -> Option<BlockId> {
        self.cached.get(&h).copied()
    }

    /// Hands out the free block `id` itself, with ref count 1 and out of the prefix cache: a
    /// sequence reuses its leading slots and overwrites the rest (a partial prefix hit).
    /// False (and no change) unless the block is free.
    pub fn take_free(&mut self, id: BlockId) -> bool {
        if id.0 == 0 || self.blocks[id.0 as usize].ref_count != 0 {
            return false;
        }
        self.hand_out(id.0);
        true
    }

    /// Moves free block `id` out of the queue to ref count 1, evicting its stale hash.
    fn hand_out(&mut self, id: u32) {
        self.unlink(id);
        let meta = &mut self.blocks[id as usize];
        meta.ref_count = 1;
        if let Some(h) = meta.hash.take() {
            if self.cached.get(&h) == Some(&BlockId(id)) {
                self.cached.remove(&h);
            }
        }
    }

    /// Takes one more reference on each block; a block at ref 0 leaves the free queue.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &BlockId(id) in ids {
            if self.blocks[id as usize].ref_count == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_count += 1;
        }
    }

    /// Drops one reference on each block, in order. Cached blocks reaching 0 go to the queue's
    /// tail (so pass a sequence's blocks last-first: its tail is evicted before its shared
    /// prefix); blocks without a hash go to the head, to be handed out before any cached one.
    pub fn release(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for BlockId(id) in ids {
            let meta = &mut self.blocks[id as usize];
            meta.ref_count = meta
                .ref_count
                .checked_sub(1)
                .expect("invariant: released block has a reference");
            if meta.ref_count == 0 {
                if meta.hash.is_some() {
                    self.push_tail(id);
                } else {
                    self.push_head(id);
                }
            }
        }
    }

    /// Registers a full block whose KV has been written under its content hash; true when it
    /// is newly cached. If another block already holds that content, the existing entry wins
    /// and this block stays unhashed.
    pub fn register_full(&mut self, id: BlockId, h: BlockHash) -> bool {
        if self.blocks[id.0 as usize].hash.is_some() || self.cached.contains_key(&h) {
            return false;
        }
        self.blocks[id.0 as usize].hash = Some(h);
        self.cached.insert(h, id);
        true
    }

    fn push_head(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        meta.prev = NIL;
        meta.next = self.head;
        if self.head == NIL {
            self.tail = id;
        } else {
            self.blocks[self.head as usize].prev = id;
        }
        self.head = id;
        self.num_free += 1;
    }

    fn push_tail(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        meta.prev = self.tail;
        meta.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: u32) {
        let BlockMeta { prev, next, .. } = self.blocks[id as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.blocks[id as usize].prev = NIL;
        self.blocks[id as usize].next = NIL;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().map(|&i| BlockId(i)).collect()
    }

    #[test]
    fn null_block_is_never_handed_out() {
        let mut pool = BlockPool::new(4);
        assert_eq!(pool.num_total(), 3);
        assert_eq!(pool.allocate(3), Some(ids(&[1, 2, 3])));
        assert_eq!(pool.allocate(1), None);
    }

    #[test]
    fn released_cached_blocks_join_the_tail_and_the_others_the_head() {
        let mut pool = BlockPool::new(6);
        let a = pool.allocate(3).expect("free blocks");
        assert_eq!(pool.free_order(), ids(&[4, 5]));
        assert!(pool.register_full(a[1], BlockHash(7)));
        pool.release(a.iter().rev().copied());
        // 3 and 1 hold nothing reusable: handed out first. 2 is cached: evicted last.
        assert_eq!(pool.free_order(), ids(&[1, 3, 4, 5, 2]));
    }

    #[test]
    fn hash_survives_free_and_is_evicted_on_reuse() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate(1).expect("free block");
        let h = BlockHash(42);
        assert!(pool.register_full(a[0], h));
        pool.release(a.clone());
        assert_eq!(pool.lookup(h), Some(a[0]));
        // Block 2 is at the head, then the freed block 1.
        assert_eq!(pool.allocate(1), Some(ids(&[2])));
        assert_eq!(pool.lookup(h), Some(a[0]));
        assert_eq!(pool.allocate(1), Some(ids(&[1])));
        assert_eq!(pool.lookup(h), None);
        assert_eq!(pool.block_hash(BlockId(1)), None);
    }

    #[test]
    fn touch_on_a_free_block_removes_it_from_the_queue() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(2).expect("free blocks");
        pool.release(a.iter().rev().copied());
        assert_eq!(pool.free_order(), ids(&[1, 2, 3]));
        pool.touch(&ids(&[2]));
        assert_eq!(pool.free_order(), ids(&[1, 3]));
        assert_eq!(pool.ref_count(BlockId(2)), 1);
        pool.touch(&ids(&[2]));
        assert_eq!(pool.ref_count(BlockId(2)), 2);
        pool.release(ids(&[2]));
        assert_eq!(pool.free_order(), ids(&[1, 3]));
        pool.release(ids(&[2]));
        assert_eq!(pool.free_order(), ids(&[2, 1, 3]));
    }

    #[test]
    fn duplicate_content_keeps_the_first_registration() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(2).expect("free blocks");
        assert!(pool.register_full(a[0], BlockHash(9)));
        assert!(!pool.register_full(a[1], BlockHash(9)));
        assert_eq!(pool.lookup(BlockHash(9)), Some(a[0]));
        assert_eq!(pool.block_hash(a[1]), None);
    }
}
