//! Paged KV memory bookkeeping: which fixed-size block holds which tokens of which sequence.
//!
//! Owner: the engine thread (through `Scheduler`). Pure CPU; never touches tensors — the tensors
//! live in `models::paged_kv`, indexed by the `BlockId`s handed out here.

pub mod block_hash;
pub mod block_pool;
pub mod manager;

pub use block_hash::{hash_block_tokens, BlockHash};
pub use block_pool::{BlockId, BlockPool};
pub use manager::{BlockManager, NoFreeBlocks, PrefixHit, PrefixKeys};
