//! Turns a `SchedulerOutput` into the model's packed `BatchInput` (host vectors → device).

use candle_core::{Device, Result, Tensor};

use crate::models::BatchInput;
use crate::scheduler::{Scheduler, SchedulerOutput};

/// Flattens every scheduled sequence's new tokens, positions and KV slots.
pub fn build_batch<T>(out: &SchedulerOutput, scheduler: &Scheduler<T>, device: &Device) -> Result<BatchInput> {
    let block_size = scheduler.blocks().block_size();
    let num_tokens = out.num_tokens();
    let mut token_ids = Vec::with_capacity(num_tokens);
    let mut positions = Vec::with_capacity(num_tokens);
    let mut slot_mapping = Vec::with_capacity(num_tokens);
    let mut context_slots = Vec::new();
    let mut q_lens = Vec::with_capacity(out.seqs.len());
    let mut kv_lens = Vec::with_capacity(out.seqs.len());
    let mut logits_rows = Vec::new();
    for s in &out.seqs {
        let seq = scheduler.seq(s.id).expect("invariant: scheduled sequences are live");
        let table = scheduler.block_table(s.id);
        let slot = |p: usize| table[p / block_size].0 * block_size as u32 + (p % block_size) as u32;
        let kv_len = s.num_computed + s.num_new;
        for p in s.num_computed..kv_len {
            token_ids.push(seq.tokens[p]);
            positions.push(p as u32);
            slot_mapping.push(slot(p));
        }
        context_slots.extend((0..kv_len).map(slot));
        if s.sample {
            logits_rows.push((token_ids.len() - 1) as u32);
        }
        q_lens.push(s.num_new);
        kv_lens.push(kv_len);
    }
    let n_ctx = context_slots.len();
    let n_rows = logits_rows.len();
    Ok(BatchInput {
        token_ids: Tensor::from_vec(token_ids, num_tokens, device)?,
        positions: Tensor::from_vec(positions, num_tokens, device)?,
        slot_mapping: Tensor::from_vec(slot_mapping, num_tokens, device)?,
        context_slots: Tensor::from_vec(context_slots, n_ctx, device)?,
        q_lens,
        kv_lens,
        logits_rows: Tensor::from_vec(logits_rows, n_rows, device)?,
    })
}
