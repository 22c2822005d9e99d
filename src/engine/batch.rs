//! Turns a `SchedulerOutput` into the model's packed inputs: host vectors first (`HostBatch`),
//! then device tensors (`BatchInput`), so a CUDA graph runner can put the same vectors into
//! its own fixed buffers instead.

use candle_core::{Device, Result, Tensor};

use crate::compute::batch::BatchInput;
use crate::scheduler::{Scheduler, SchedulerOutput};

/// One step's inputs on the host (see `BatchInput` for each field's meaning).
#[derive(Debug, Default)]
pub struct HostBatch {
    /// Token ids of all sequences concatenated.
    pub token_ids: Vec<u32>,
    /// Absolute position of each token.
    pub positions: Vec<u32>,
    /// KV slot each new token's K/V is written to.
    pub slot_mapping: Vec<u32>,
    /// KV slots of every sequence's whole context, in position order.
    pub context_slots: Vec<u32>,
    /// Tokens fed per sequence.
    pub q_lens: Vec<usize>,
    /// Context length per sequence after this step.
    pub kv_lens: Vec<usize>,
    /// Row of the last token of each sequence that samples.
    pub logits_rows: Vec<u32>,
}

impl HostBatch {
    /// Flattens every scheduled sequence's new tokens, positions and KV slots.
    pub fn build<T>(out: &SchedulerOutput, scheduler: &Scheduler<T>) -> Self {
        let block_size = scheduler.blocks().block_size();
        let num_tokens = out.num_tokens();
        let mut b = HostBatch {
            token_ids: Vec::with_capacity(num_tokens),
            positions: Vec::with_capacity(num_tokens),
            slot_mapping: Vec::with_capacity(num_tokens),
            q_lens: Vec::with_capacity(out.seqs.len()),
            kv_lens: Vec::with_capacity(out.seqs.len()),
            ..Default::default()
        };
        for s in &out.seqs {
            let seq = scheduler.seq(s.id).expect("invariant: scheduled sequences are live");
            let table = scheduler.block_table(s.id);
            let slot = |p: usize| table[p / block_size].0 * block_size as u32 + (p % block_size) as u32;
            let kv_len = s.num_computed + s.num_new;
            for p in s.num_computed..kv_len {
                b.token_ids.push(seq.tokens[p]);
                b.positions.push(p as u32);
                b.slot_mapping.push(slot(p));
            }
            b.context_slots.extend((0..kv_len).map(slot));
            if s.sample {
                b.logits_rows.push((b.token_ids.len() - 1) as u32);
            }
            b.q_lens.push(s.num_new);
            b.kv_lens.push(kv_len);
        }
        b
    }

    /// The same inputs as fresh device tensors (the vectors move into them).
    pub fn upload(self, device: &Device) -> Result<BatchInput> {
        let t = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, device)
        };
        Ok(BatchInput {
            token_ids: t(self.token_ids)?,
            positions: t(self.positions)?,
            slot_mapping: t(self.slot_mapping)?,
            context_slots: t(self.context_slots)?,
            q_lens: self.q_lens,
            kv_lens: self.kv_lens,
            logits_rows: t(self.logits_rows)?,
            fixed: None,
            images: None,
        })
    }
}
