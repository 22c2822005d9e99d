//! Seeded randomized test of the scheduler + block manager invariants (TGI radix style):
//! 100k random admit / step (extend, finish, preempt) / abort operations over a 2-token
//! vocabulary, so prefixes are shared all the time.

use std::collections::{HashMap, HashSet};

use mlxd::request::RequestId;
use mlxd::scheduler::kv::{BlockId, BlockManager};
use mlxd::scheduler::{Scheduler, SchedulerConfig, Sequence, SequenceSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4;
const NUM_BLOCKS: usize = 48;

fn check_invariants(s: &Scheduler) {
    let m = s.blocks();
    let pool = m.pool();
    let mut refs: HashMap<BlockId, u32> = HashMap::new();
    let mut owners: HashMap<BlockId, Vec<RequestId>> = HashMap::new();
    for (id, table) in m.tables() {
        let seq = s.seq(id).expect("a table belongs to a live sequence");
        assert!(
            table.len() * BLOCK >= seq.num_computed,
            "table covers the computed tokens"
        );
        for b in table {
            assert_ne!(*b, BlockId(0), "the null block is never handed out");
            *refs.entry(*b).or_default() += 1;
            owners.entry(*b).or_default().push(id);
        }
    }
    let free: Vec<BlockId> = pool.free_order();
    let free_set: HashSet<BlockId> = free.iter().copied().collect();
    assert_eq!(free.len(), free_set.len(), "no block twice in the free queue");
    assert_eq!(free.len(), pool.num_free());
    for i in 1..NUM_BLOCKS as u32 {
        let b = BlockId(i);
        let r = refs.get(&b).copied().unwrap_or(0);
        assert_eq!(pool.ref_count(b), r, "ref count of {b:?} equals its table references");
        assert_eq!(free_set.contains(&b), r == 0, "free ∪ used = all, disjoint ({b:?})");
        if let Some(h) = pool.block_hash(b) {
            assert_eq!(pool.lookup(h), Some(b), "a hashed block maps to itself");
        }
        if owners.get(&b).is_some_and(|o| o.len() > 1) {
            assert!(pool.block_hash(b).is_some(), "only cached prefix blocks are shared");
        }
    }
}

#[test]
fn hundred_thousand_random_operations_keep_every_invariant() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 6,
            max_num_batched_tokens: 24,
            max_model_len: 96,
        },
        BlockManager::new(NUM_BLOCKS, BLOCK, true),
    );
    let mut next_id = 0u64;
    let mut live: Vec<RequestId> = Vec::new();
    let mut emitted: HashMap<RequestId, usize> = HashMap::new();
    let mut max_tokens: HashMap<RequestId, usize> = HashMap::new();
    let (mut finished, mut aborted, mut prefix_hits) = (0, 0, 0);
    for _ in 0..100_000 {
        match rng.random_range(0..10) {
            0..=2 if live.len() < 12 => {
                next_id += 1;
                let id = RequestId(next_id);
                let len = rng.random_range(1..40);
                let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(0..2)).collect();
                let max = rng.random_range(1..30);
                let spec = SequenceSpec {
                    prompt,
                    max_tokens: max,
                    stop_tokens: Vec::new(),
                    cache_salt: 0,
                    reuse_cached_prefix: true,
                    max_chunk: None,
                    images: Vec::new(),
                };
                s.add(Sequence::new(id, spec, BLOCK), ());
                live.push(id);
                max_tokens.insert(id, max);
            }
            9 if !live.is_empty() => {
                let id = live.swap_remove(rng.random_range(0..live.len()));
                assert!(s.abort(id).is_some());
                aborted += 1;
            }
            _ => {
                let out = s.schedule();
                assert!(out.num_tokens() <= 24);
                for x in &out.seqs {
                    if x.num_computed > 0 && s.seq(x.id).is_some_and(|q| q.num_generated() == 0) {
                        prefix_hits += 1;
                    }
                }
                let n = out.seqs.iter().filter(|x| x.sample).count();
                let sampled: Vec<u32> = (0..n).map(|_| rng.random_range(0..2)).collect();
                for r in s.update(&out, &sampled) {
                    *emitted.entry(r.id).or_default() += 1;
                    if r.finished.is_some() {
                        assert_eq!(
                            emitted[&r.id], max_tokens[&r.id],
                            "exactly max_tokens tokens, none lost"
                        );
                        live.retain(|x| *x != r.id);
                        finished += 1;
                    }
                }
            }
        }
        check_invariants(&s);
    }
    for id in live.drain(..) {
        s.abort(id);
    }
    check_invariants(&s);
    assert_eq!(s.blocks().pool().num_free(), NUM_BLOCKS - 1, "nothing leaks");
    assert!(
        finished > 1000 && aborted > 1000,
        "finished {finished}, aborted {aborted}"
    );
    assert!(s.num_preemptions() > 100, "preemptions {}", s.num_preemptions());
    assert!(prefix_hits > 100, "prefix hits {prefix_hits}");
}
