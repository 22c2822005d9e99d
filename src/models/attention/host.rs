//! CPU attention over the paged cache in place (f32 KV): every sequence's queries, decode and
//! prefill chunks alike, attend by reading their context's K/V rows straight from the cache
//! slots, with an online softmax (one pass over the keys, as flash attention) and a vectorizable
//! exp. Work is split into (sequence, KV head, block of queries) items run in parallel; each
//! key row loaded serves every query head that shares its KV head and every query of the block.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionOpts, HeadDims, SlotWriter};
use crate::models::batch::BatchInput;
use crate::models::paged_kv::LayerKv;

/// Queries per work item (times the query heads of one KV head).
const QUERY_BLOCK: usize = 16;
/// Keys scored at once per item.
const KEY_TILE: usize = 64;
/// Query rows (queries × heads sharing a KV head) from which a key tile is transposed.
const TRANSPOSE_ROWS: usize = 16;

/// One sequence of the batch: its query rows and its context's slots.
#[derive(Debug, Clone, Copy)]
struct HostSeq {
    q_start: usize,
    q_len: usize,
    /// Offset of this sequence's slots in `context_slots`.
    ctx_start: usize,
    kv_len: usize,
}

/// Per-forward bookkeeping of the host path, shared by all layers.
#[derive(Debug)]
pub struct HostPlan {
    dims: HeadDims,
    slots: SlotWriter,
    context_slots: Vec<u32>,
    seqs: Vec<HostSeq>,
}

impl HostPlan {
    /// The plan for `batch`, or None unless it runs on the CPU with f32 KV.
    pub fn new(batch: &BatchInput, dims: HeadDims, dtype: DType) -> Result<Option<Self>> {
        if !batch.slot_mapping.device().is_cpu() || dtype != DType::F32 {
            return Ok(None);
        }
        let mut seqs = Vec::with_capacity(batch.q_lens.len());
        let (mut q_start, mut ctx_start) = (0, 0);
        for (&q_len, &kv_len) in batch.q_lens.iter().zip(&batch.kv_lens) {
            seqs.push(HostSeq {
                q_start,
                q_len,
                ctx_start,
                kv_len,
            });
            q_start += q_len;
            ctx_start += kv_len;
        }
        Ok(Some(Self {
            dims,
            slots: SlotWriter::new(batch, dims)?,
            context_slots: batch.context_slots.to_vec1()?,
            seqs,
        }))
    }

    /// The head layout the plan was built for.
    pub fn dims(&self) -> HeadDims {
        self.dims
    }

    /// Where this step's K/V rows go.
    pub(super) fn slots(&self) -> &SlotWriter {
        &self.slots
    }
}

/// One unit of work: a block of one sequence's queries under one KV head.
#[derive(Debug, Clone, Copy)]
struct Item {
    seq: usize,
    kv_head: usize,
    first_query: usize,
    queries: usize,
}

/// Attends every sequence's queries (`[T, heads, head_dim]`, rotated) over its context.
/// Returns `[T, heads * head_dim]`.
pub fn attend(q: &Tensor, kv: &LayerKv, plan: &HostPlan, opts: AttentionOpts) -> Result<Tensor> {
    let HeadDims {
        num_heads,
        num_kv_heads,
        head_dim,
    } = plan.dims;
    let t = q.dim(0)?;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let items: Vec<Item> = plan
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(seq, s)| {
            (0..num_kv_heads).flat_map(move |kv_head| {
                (0..s.q_len).step_by(QUERY_BLOCK).map(move |first| Item {
                    seq,
                    kv_head,
                    first_query: first,
                    queries: QUERY_BLOCK.min(s.q_len - first),
                })
            })
        })
        .collect();
    let outputs: Vec<Vec<f32>> = with_f32(&q, |q| {
        with_f32(&kv.k, |k| {
            with_f32(&kv.v, |v| {
                let cache = Cache { k, v, plan, opts };
                Ok(items.par_iter().map(|item| cache.attend_item(q, *item)).collect())
            })
        })
    })?;
    let n_rep = num_heads / num_kv_heads;
    let mut out = vec![0f32; t * num_heads * head_dim];
    for (item, rows) in items.iter().zip(&outputs) {
        let s = plan.seqs[item.seq];
        for (i, row) in rows.chunks_exact(n_rep * head_dim).enumerate() {
            let at = ((s.q_start + item.first_query + i) * num_heads + item.kv_head * n_rep) * head_dim;
            out[at..at + row.len()].copy_from_slice(row);
        }
    }
    Tensor::from_vec(out, (t, num_heads * head_dim), q.device())
}

/// Runs `f` on the f32 values of a contiguous CPU tensor, without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("host attention reads CPU tensors");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("host attention reads contiguous tensors");
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// The cache of one layer and how to attend over it.
struct Cache<'a> {
    k: &'a [f32],
    v: &'a [f32],
    plan: &'a HostPlan,
    opts: AttentionOpts,
}

impl Cache<'_> {
    /// `[queries, n_rep, head_dim]` outputs of one item.
    fn attend_item(&self, q_all: &[f32], item: Item) -> Vec<f32> {
        let HeadDims {
            num_heads,
            num_kv_heads,
            head_dim: hd,
        } = self.plan.dims;
        let n_rep = num_heads / num_kv_heads;
        let kv_width = num_kv_heads * hd;
        let s = self.plan.seqs[item.seq];
        let slots = &self.plan.context_slots[s.ctx_start..s.ctx_start + s.kv_len];
        let rows = item.queries * n_rep;
        // Queries pre-scaled, [rows, hd] with row = query · n_rep + rep.
        let scale = self.opts.scale as f32;
        let mut q = Vec::with_capacity(rows * hd);
        for i in 0..item.queries {
            let at = ((s.q_start + item.first_query + i) * num_heads + item.kv_head * n_rep) * hd;
            q.extend(q_all[at..at + n_rep * hd].iter().map(|x| x * scale));
        }
        // Visible keys of query i: [lo, hi] (causal, optionally windowed).
        let bounds = |i: usize| {
            let pos = s.kv_len - s.q_len + item.first_query + i;
            let lo = self.opts.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            (lo, pos)
        };
        let (first_key, last_key) = (bounds(0).0, bounds(item.queries - 1).1);
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut acc = vec![0f32; rows * hd];
        let mut scores = vec![0f32; rows * KEY_TILE];
        let head_offset = item.kv_head * hd;
        // Many rows (prefill blocks): the tile's keys transposed, [hd, KEY_TILE], so a row's
        // scores for the whole tile are hd multiply-adds of whole tile rows (no horizontal
        // sums). Few rows (decode): the transpose would cost more than it saves; one dot
        // product per (row, key) instead.
        let transpose = rows >= TRANSPOSE_ROWS;
        let mut keys_t = vec![0f32; if transpose { hd * KEY_TILE } else { 0 }];
        for tile in (first_key..=last_key).step_by(KEY_TILE) {
            let tile_end = (tile + KEY_TILE).min(last_key + 1);
            let key = |j: usize| &self.k[slots[j] as usize * kv_width + head_offset..][..hd];
            if transpose {
                for j in tile..tile_end {
                    for (d, &x) in key(j).iter().enumerate() {
                        keys_t[d * KEY_TILE + j - tile] = x;
                    }
                }
            }
            // Scores of every query row that sees any key of the tile.
            for i in 0..item.queries {
                let (lo, hi) = bounds(i);
                if hi < tile || lo >= tile_end {
                    continue;
                }
                for r in 0..n_rep {
                    let row = i * n_rep + r;
                    let q_row = &q[row * hd..(row + 1) * hd];
                    let out: &mut [f32; KEY_TILE] = (&mut scores[row * KEY_TILE..(row + 1) * KEY_TILE])
                        .try_into()
                        .expect("a tile row");
                    if !transpose {
                        for j in lo.max(tile)..=hi.min(tile_end - 1) {
                            out[j - tile] = dot(q_row, key(j));
                        }
                        continue;
                    }
                    *out = [0.0; KEY_TILE];
                    for (&qd, kd) in q_row.iter().zip(keys_t.chunks_exact(KEY_TILE)) {
                        for (o, &k) in out.iter_mut().zip(kd) {
                            *o += qd * k;
                        }
                    }
                }
            }
            // Per row over its visible part of the tile: the online softmax update, then the
            // values weighted by the probabilities (16 output lanes at a time stay in registers
            // across the tile's keys).
            let value = |j: usize| &self.v[slots[j] as usize * kv_width + head_offset..][..hd];
            for i in 0..item.queries {
                let (lo, hi) = bounds(i);
                let (a, b) = (lo.max(tile), hi.min(tile_end - 1));
                if a > b {
                    continue;
                }
                for r in 0..n_rep {
                    let row = i * n_rep + r;
                    let part = &mut scores[row * KEY_TILE + a - tile..row * KEY_TILE + b - tile + 1];
                    if let Some(cap) = self.opts.softcap {
                        let cap = cap as f32;
                        part.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
                    }
                    let tile_max = part.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let new_max = max[row].max(tile_max);
                    let keep = exp(max[row] - new_max);
                    part.iter_mut().for_each(|x| *x = exp(*x - new_max));
                    sum[row] = sum[row] * keep + part.iter().sum::<f32>();
                    max[row] = new_max;
                    let out = &mut acc[row * hd..(row + 1) * hd];
                    out.iter_mut().for_each(|x| *x *= keep);
                    add_weighted(out, part, |n| value(a + n));
                }
            }
        }
        for (row, out) in acc.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / sum[row];
            out.iter_mut().for_each(|x| *x *= inv);
        }
        acc
    }
}

/// `Σ a·b` with two independent 16-lane partial sums (vectorizes; no single dependency chain).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (mut l0, mut l1) = ([0f32; 16], [0f32; 16]);
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            l0[i] += x[i] * y[i];
            l1[i] += x[16 + i] * y[16 + i];
        }
    }
    l0.iter().zip(&l1).map(|(p, q)| p + q).sum::<f32>() + tail
}

/// `acc += Σ_n weights[n] · row(n)`, 16 lanes of `acc` at a time held across all rows.
#[inline(always)]
fn add_weighted<'r>(acc: &mut [f32], weights: &[f32], row: impl Fn(usize) -> &'r [f32]) {
    let lanes = acc.len() / 16 * 16;
    for (c, out) in acc[..lanes].chunks_exact_mut(16).enumerate() {
        let mut sum = [0f32; 16];
        for (n, &w) in weights.iter().enumerate() {
            let v = &row(n)[c * 16..c * 16 + 16];
            for i in 0..16 {
                sum[i] += w * v[i];
            }
        }
        out.iter_mut().zip(&sum).for_each(|(o, s)| *o += s);
    }
    for (n, &w) in weights.iter().enumerate() {
        acc[lanes..]
            .iter_mut()
            .zip(&row(n)[lanes..])
            .for_each(|(o, v)| *o += w * v);
    }
}

/// e^x for x ≤ 0 (scores less their running max) in plain arithmetic the compiler vectorizes:
/// x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its degree-6 Taylor polynomial (relative error
/// below 2e-7), 2^n through the exponent bits; below -87 (and -inf) the result is 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    if x < -87.0 {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn the_vectorizable_exp_matches_the_library_exp() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want + 1e-37, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
