//! Chained content hashes of full KV blocks, the keys of the prefix cache.
//!
//! `hash(block i) = xxh3(parent = hash(block i-1), token ids of block i, extra)`: equal hashes mean
//! equal token prefixes (up to 64-bit collisions, acceptable for a local server; vLLM offers
//! sha256 for multi-tenant safety). xxh3 with a fixed seed is stable across builds and runs,
//! unlike `DefaultHasher`.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every block hash; changing it invalidates nothing persistent (the cache is in memory).
const BLOCK_HASH_SEED: u64 = 0x6d6c_7864_6b76_3031;

/// Hash of a full block of tokens together with all the tokens before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Hashes one full block given its parent's hash (None for the first block) and an `extra`
/// salt (model/adapter/cache isolation) that only enters the first block.
pub fn hash_block_tokens(parent: Option<BlockHash>, tokens: &[u32], extra: u64) -> BlockHash {
    let mut bytes = Vec::with_capacity(8 + tokens.len() * 4);
    match parent {
        Some(BlockHash(h)) => bytes.extend_from_slice(&h.to_le_bytes()),
        None => bytes.extend_from_slice(&extra.to_le_bytes()),
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    BlockHash(xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED))
}

/// Extends `hashes` with the hashes of every full block of `tokens` not yet hashed.
pub fn extend_block_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize, extra: u64) {
    let num_full = tokens.len() / block_size;
    while hashes.len() < num_full {
        let i = hashes.len();
        let block = &tokens[i * block_size..(i + 1) * block_size];
        let h = hash_block_tokens(hashes.last().copied(), block, extra);
        hashes.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_hash_equal_and_parents_chain() {
        let a = hash_block_tokens(None, &[1, 2, 3, 4], 0);
        let b = hash_block_tokens(None, &[1, 2, 3, 4], 0);
        assert_eq!(a, b);
        let salted = hash_block_tokens(None, &[1, 2, 3, 4], 7);
        assert_ne!(a, salted);
        let child_a = hash_block_tokens(Some(a), &[5, 6, 7, 8], 0);
        let child_other_parent = hash_block_tokens(Some(salted), &[5, 6, 7, 8], 0);
        assert_ne!(child_a, child_other_parent);
    }

    #[test]
    fn extend_hashes_only_full_blocks() {
        let mut hashes = Vec::new();
        extend_block_hashes(&mut hashes, &[1, 2, 3, 4, 5, 6, 7], 4, 0);
        assert_eq!(hashes.len(), 1);
        extend_block_hashes(&mut hashes, &[1, 2, 3, 4, 5, 6, 7, 8], 4, 0);
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[1], hash_block_tokens(Some(hashes[0]), &[5, 6, 7, 8], 0));
    }
}
