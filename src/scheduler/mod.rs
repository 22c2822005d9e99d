//! Continuous batching: each step decides which sequences run and how many tokens each feeds.
//!
//! Owner: the engine thread. Pure CPU, no tensors. Follows vLLM v1's scheduler: there is no
//! separate prefill phase — every running sequence asks for `len(tokens) - num_computed` new
//! tokens, capped by the step's token budget, so long prompts are chunked across steps while
//! other sequences keep decoding. When blocks run out the newest running sequence is preempted
//! by recompute: it frees its blocks and goes back to the front of the queue.
//!
//! The scheduler holds each live request's ONE record: its `Sequence` (tokens, progress) next
//! to the owner's payload `T` (the engine's reply channel, sampler and timing), so that
//! neither side keeps a second map keyed by the same id.

pub mod kv;
pub mod sequence;

use std::collections::{HashMap, VecDeque};

use crate::request::{FinishReason, RequestId};
use kv::{BlockId, BlockManager, PrefixHit};
pub use sequence::{Sequence, SequenceSpec};

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens fed to the model in one step (prefill chunks + decode tokens).
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output) the model supports.
    pub max_model_len: usize,
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// Which sequence.
    pub id: RequestId,
    /// Tokens already in the KV cache before this step.
    pub num_computed: usize,
    /// Tokens fed this step (positions `num_computed .. num_computed + num_new`).
    pub num_new: usize,
    /// True when this step reaches the sequence's last token, so a new token is sampled.
    pub sample: bool,
}

/// The plan of one step.
#[derive(Clone, Debug, Default)]
pub struct SchedulerOutput {
    /// Sequences in batch order.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<RequestId>,
}

impl SchedulerOutput {
    /// Total tokens fed this step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_new).sum()
    }
}

/// Tokens `seq` feeds this step from `from` with `budget` left: the rest of it, cut to the
/// budget and its chunk size, ending where `Sequence::chunk_end` allows; None when what must go
/// together (the rest of an image) exceeds the budget.
fn chunk(seq: &Sequence, from: usize, budget: usize) -> Option<usize> {
    let want = (seq.tokens.len() - from).min(budget).min(seq.max_chunk);
    let end = seq.chunk_end(from, from + want);
    (end > from && end - from <= budget).then_some(end - from)
}

/// The result of one sampled token for one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepResult<T = ()> {
    /// Which sequence.
    pub id: RequestId,
    /// The token appended.
    pub token: u32,
    /// Set when the sequence finished with this token (it has been freed).
    pub finished: Option<FinishReason>,
    /// The payload of a finished sequence, handed back since the scheduler dropped it.
    pub released: Option<T>,
}

/// One live request: the scheduler's sequence and its owner's payload.
#[derive(Debug)]
struct Entry<T> {
    seq: Sequence,
    data: T,
}

/// Waiting queue, running set and KV block tables, plus each request's record.
#[derive(Debug)]
pub struct Scheduler<T = ()> {
    cfg: SchedulerConfig,
    seqs: HashMap<RequestId, Entry<T>>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    blocks: BlockManager,
    num_preemptions: u64,
}

impl<T> Scheduler<T> {
    /// A scheduler over a block manager sized by the engine.
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence with its owner's payload (FCFS).
    pub fn add(&mut self, seq: Sequence, data: T) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, Entry { seq, data });
    }

    /// Removes a sequence wherever it is, frees its blocks, and hands back its record.
    pub fn abort(&mut self, id: RequestId) -> Option<(Sequence, T)> {
        let entry = self.seqs.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|r| *r != id);
        self.blocks.free(id);
        Some((entry.seq, entry.data))
    }

    /// True while any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Sequences admitted and not finished.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences queued (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Longest sequence (prompt + output) allowed.
    pub fn max_model_len(&self) -> usize {
        self.cfg.max_model_len
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// A live sequence.
    pub fn seq(&self, id: RequestId) -> Option<&Sequence> {
        self.seqs.get(&id).map(|e| &e.seq)
    }

    /// A live sequence together with its payload.
    pub fn entry(&self, id: RequestId) -> Option<(&Sequence, &T)> {
        self.seqs.get(&id).map(|e| (&e.seq, &e.data))
    }

    /// A live sequence together with its payload, mutable.
    pub fn entry_mut(&mut self, id: RequestId) -> Option<(&Sequence, &mut T)> {
        self.seqs.get_mut(&id).map(|e| (&e.seq, &mut e.data))
    }

    /// Every live request, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&Sequence, &T)> {
        self.seqs.values().map(|e| (&e.seq, &e.data))
    }

    /// The block manager (read-only: stats, block tables for the batch builder).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Mutable access to the block manager, for the owner's cache tiers (recording newly
    /// cached blocks, adopting blocks read from disk); never for tables of live sequences.
    pub fn blocks_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }

    /// Block table of a sequence.
    pub fn block_table(&self, id: RequestId) -> &[BlockId] {
        self.blocks.table(id)
    }

    /// Plans one step: running sequences first (preempting on shortage), then waiting ones.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.schedule_running(&mut out, &mut budget);
        if out.preempted.is_empty() {
            self.schedule_waiting(&mut out, &mut budget);
        }
        out
    }

    fn schedule_running(&mut self, out: &mut SchedulerOutput, budget: &mut usize) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id].seq;
            let Some(num_new) = chunk(seq, seq.num_computed, *budget) else {
                // The rest of an image does not fit this step's budget: next step.
                i += 1;
                continue;
            };
            let num_total = seq.num_computed + num_new;
            let mut self_preempted = false;
            while self
                .blocks
                .allocate_slots(id, num_total, &PrefixHit::default())
                .is_err()
            {
                let victim = *self.running.last().expect("invariant: `id` is running");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let seq = &self.seqs[&id].seq;
            out.seqs.push(ScheduledSeq {
                id,
                num_computed: seq.num_computed,
                num_new,
                sample: num_total == seq.tokens.len(),
            });
            *budget -= num_new;
            i += 1;
        }
    }

    fn schedule_waiting(&mut self, out: &mut SchedulerOutput, budget: &mut usize) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = &self.seqs[&id].seq;
            let hit = match seq.reuse_cached_prefix {
                true => self.blocks.find_prefix_hit(seq.prefix_keys()),
                false => PrefixHit::default(),
            };
            let num_computed = hit.num_tokens(self.blocks.block_size());
            let Some(num_new) = chunk(seq, num_computed, *budget) else {
                break;
            };
            let num_total = num_computed + num_new;
            if self.blocks.allocate_slots(id, num_total, &hit).is_err() {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            let seq = &mut self.seqs.get_mut(&id).expect("invariant: waiting id is live").seq;
            seq.num_computed = num_computed;
            seq.num_cached_prompt_tokens.get_or_insert(num_computed);
            out.seqs.push(ScheduledSeq {
                id,
                num_computed,
                num_new,
                sample: num_total == seq.tokens.len(),
            });
            *budget -= num_new;
        }
    }

    fn preempt(&mut self, id: RequestId) {
        self.running.retain(|r| *r != id);
        self.blocks.free(id);
        if let Some(e) = self.seqs.get_mut(&id) {
            e.seq.num_computed = 0;
        }
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }

    /// Applies a finished step: advances `num_computed`, registers full blocks in the prefix
    /// cache, appends the sampled tokens (in the order of the sampling sequences of `out`),
    /// checks token-level stops and frees finished sequences.
    pub fn update(&mut self, out: &SchedulerOutput, sampled: &[u32]) -> Vec<StepResult<T>> {
        let mut results = Vec::with_capacity(sampled.len());
        let mut sampled = sampled.iter();
        let block_size = self.blocks.block_size();
        for s in &out.seqs {
            let token = s.sample.then(|| {
                *sampled
                    .next()
                    .expect("invariant: one sampled token per sampling sequence")
            });
            let Some(seq) = self.seqs.get_mut(&s.id).map(|e| &mut e.seq) else {
                continue;
            };
            seq.num_computed = s.num_computed + s.num_new;
            self.blocks.register_computed(s.id, seq.prefix_keys(), seq.num_computed);
            let Some(token) = token else {
                continue;
            };
            seq.append(token, block_size);
            let finished = seq.check_stop(self.cfg.max_model_len);
            let released = finished.and_then(|_| self.abort(s.id)).map(|(_, data)| data);
            results.push(StepResult {
                id: s.id,
                token,
                finished,
                released,
            });
        }
        results
    }
}
