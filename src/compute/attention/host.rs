//! CPU attention over the paged cache (f32 queries; f32, f16 or bf16 KV, widened to f32 as
//! each tile is copied): every sequence's queries, decode and prefill chunks alike, attend over
//! their context's K/V rows read from the cache slots (no gathered context tensor), with an
//! online softmax (one pass over the keys, as flash attention) and a
//! vectorizable exp. Work is split into (sequence, KV head, block of queries) items run in
//! parallel; per tile of keys, the scores and the value sums are two small GEMMs (`gemm`
//! crate) over every query row of the item: the query heads sharing the KV head and the
//! queries of the block.

use candle_core::{DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{AttentionOpts, HeadDims, SlotWriter};
use crate::compute::batch::BatchInput;
use crate::compute::cpu::host_ops::{exp, exp_shifted_sum};
use crate::compute::paged_kv::LayerKv;
use crate::compute::Numerics;

/// Queries per work item (times the query heads of one KV head).
const QUERY_BLOCK: usize = 16;
/// Keys scored at once per item.
const KEY_TILE: usize = 64;

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
    /// Per token row, the last position it sees (None: every row is causal).
    last_visible: Option<Vec<u32>>,
    /// `BatchInvariant`: key tiles at absolute positions and each row's sums in a fixed order.
    numerics: Numerics,
}

impl HostPlan {
    /// The plan for `batch`, or None unless it runs on the CPU with f32 compute (`dtype`).
    pub fn new(batch: &BatchInput, dims: HeadDims, dtype: DType, numerics: Numerics) -> Result<Option<Self>> {
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
            last_visible: batch.images.as_ref().map(|i| i.last_visible.clone()),
            numerics,
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
pub fn attend(q: &Tensor, kv: &LayerKv, plan: &HostPlan, opts: &AttentionOpts) -> Result<Tensor> {
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
    let sinks: Option<Vec<f32>> = opts
        .sinks
        .as_ref()
        .map(|s| s.to_dtype(DType::F32)?.to_vec1())
        .transpose()?;
    if sinks.as_ref().is_some_and(|s| s.len() != num_heads) {
        candle_core::bail!("attention sinks need one logit per query head ({num_heads})");
    }
    let job = Job {
        plan,
        opts,
        sinks: sinks.as_deref(),
        items: &items,
    };
    let outputs = with_slice(&q, |q: &[f32]| match kv.k.dtype() {
        DType::F32 => job.run::<f32>(q, kv),
        DType::F16 => job.run::<f16>(q, kv),
        DType::BF16 => job.run::<bf16>(q, kv),
        other => candle_core::bail!("host attention reads f32, f16 or bf16 KV, not {other:?}"),
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

/// Runs `f` on the values of a contiguous CPU tensor, without copying them.
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("host attention reads CPU tensors");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("host attention reads contiguous tensors");
    };
    f(&cpu.as_slice::<T>()?[start..end])
}

/// A KV element type the host path reads.
trait KvElement: WithDType {
    /// Writes `src` widened to f32 into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl KvElement for f32 {
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElement for f16 {
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl KvElement for bf16 {
    fn widen(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// This layer's work items and how to attend.
struct Job<'a> {
    plan: &'a HostPlan,
    opts: &'a AttentionOpts,
    sinks: Option<&'a [f32]>,
    items: &'a [Item],
}

impl Job<'_> {
    /// Every item's outputs, in parallel, over a cache of `T` values.
    fn run<T: KvElement>(&self, q: &[f32], kv: &LayerKv) -> Result<Vec<Vec<f32>>> {
        with_slice(&kv.k, |k: &[T]| {
            with_slice(&kv.v, |v: &[T]| {
                let cache = Cache {
                    k,
                    v,
                    plan: self.plan,
                    opts: self.opts,
                    sinks: self.sinks,
                };
                Ok(self.items.par_iter().map(|item| cache.attend_item(q, *item)).collect())
            })
        })
    }
}

/// The cache of one layer and how to attend over it.
struct Cache<'a, T> {
    k: &'a [T],
    v: &'a [T],
    plan: &'a HostPlan,
    opts: &'a AttentionOpts,
    sinks: Option<&'a [f32]>,
}

/// One item's query rows, ready to attend: the queries pre-scaled (`[rows, hd]`, row =
/// query · n_rep + rep), each query's visible keys `[lo, hi]`, and where each row's softmax
/// starts (the sinks, each a key with no value, or nothing).
struct ItemRows {
    q: Vec<f32>,
    bounds: Vec<(usize, usize)>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl ItemRows {
    /// The first and last key any of the rows sees.
    fn keys(&self) -> (usize, usize) {
        let first = self.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let last = self.bounds.iter().map(|b| b.1).max().unwrap_or(0);
        (first, last)
    }
}

impl<T: KvElement> Cache<'_, T> {
    /// `[queries, n_rep, head_dim]` outputs of one item.
    fn attend_item(&self, q_all: &[f32], item: Item) -> Vec<f32> {
        let rows = self.item_rows(q_all, item);
        let (mut out, sums) = match self.plan.numerics {
            Numerics::Fastest => self.tiles_by_gemm(item, rows),
            Numerics::BatchInvariant => self.tiles_per_row(item, rows),
        };
        for (row, sum) in out.chunks_exact_mut(self.plan.dims.head_dim).zip(&sums) {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        out
    }

    /// The item's queries, their visible keys and the softmax's start.
    fn item_rows(&self, q_all: &[f32], item: Item) -> ItemRows {
        let HeadDims {
            num_heads,
            num_kv_heads,
            head_dim: hd,
        } = self.plan.dims;
        let n_rep = num_heads / num_kv_heads;
        let s = self.plan.seqs[item.seq];
        let scale = self.opts.scale as f32;
        let mut q = Vec::with_capacity(item.queries * n_rep * hd);
        for i in 0..item.queries {
            let at = ((s.q_start + item.first_query + i) * num_heads + item.kv_head * n_rep) * hd;
            q.extend(q_all[at..at + n_rep * hd].iter().map(|x| x * scale));
        }
        // Causal, optionally windowed; an image's soft tokens also see the rest of their image.
        let bounds = (0..item.queries)
            .map(|i| {
                let pos = s.kv_len - s.q_len + item.first_query + i;
                let lo = self.opts.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let hi = self.plan.last_visible.as_ref().map_or(pos, |last| {
                    (last[s.q_start + item.first_query + i] as usize).clamp(pos, s.kv_len - 1)
                });
                (lo, hi)
            })
            .collect();
        let (max, sum) = match self.sinks {
            Some(sinks) => {
                let heads = &sinks[item.kv_head * n_rep..(item.kv_head + 1) * n_rep];
                (heads.repeat(item.queries), vec![1f32; item.queries * n_rep])
            }
            None => (
                vec![f32::NEG_INFINITY; item.queries * n_rep],
                vec![0f32; item.queries * n_rep],
            ),
        };
        ItemRows { q, bounds, max, sum }
    }

    /// Widens keys and values `tile..tile + n` of the item's sequence into `keys` and `values`
    /// (`[n, hd]` each).
    fn widen_tile(&self, item: Item, tile: usize, n: usize, keys: &mut [f32], values: &mut [f32]) {
        let hd = self.plan.dims.head_dim;
        let kv_width = self.plan.dims.num_kv_heads * hd;
        let s = self.plan.seqs[item.seq];
        let slots = &self.plan.context_slots[s.ctx_start..s.ctx_start + s.kv_len];
        let head_offset = item.kv_head * hd;
        for (j, &slot) in slots[tile..tile + n].iter().enumerate() {
            let at = slot as usize * kv_width + head_offset;
            T::widen(&self.k[at..at + hd], &mut keys[j * hd..(j + 1) * hd]);
            T::widen(&self.v[at..at + hd], &mut values[j * hd..(j + 1) * hd]);
        }
    }

    /// The default order: tiles from the item's first visible key, scores and value sums as
    /// two GEMMs over all the item's rows. Returns the unnormalized outputs and each row's sum.
    fn tiles_by_gemm(&self, item: Item, mut item_rows: ItemRows) -> (Vec<f32>, Vec<f32>) {
        let hd = self.plan.dims.head_dim;
        let n_rep = self.plan.dims.num_heads / self.plan.dims.num_kv_heads;
        let rows = item.queries * n_rep;
        let (first_key, last_key) = item_rows.keys();
        let ItemRows { q, bounds, max, sum } = &mut item_rows;
        let mut acc = vec![0f32; rows * hd];
        let mut scores = vec![0f32; rows * KEY_TILE];
        let mut keys = vec![0f32; KEY_TILE * hd];
        let mut values = vec![0f32; KEY_TILE * hd];
        for tile in (first_key..=last_key).step_by(KEY_TILE) {
            let n = (tile + KEY_TILE).min(last_key + 1) - tile;
            // The tile's K and V rows side by side, so both products below are plain GEMMs.
            self.widen_tile(item, tile, n, &mut keys, &mut values);
            // scores[rows, n] = q · keysᵀ
            gemm_into(
                MatMut::rows(&mut scores, (rows, n), KEY_TILE),
                Mat::rows(q, (rows, hd), hd),
                Mat::columns(&keys, (hd, n), hd),
                false,
            );
            // Per row: the online softmax update over its visible keys of the tile; the scores
            // become probabilities (0 for keys it must not see) and its output so far is
            // rescaled to the new running max.
            for (i, &(lo, hi)) in bounds.iter().enumerate() {
                let (a, b) = (lo.max(tile), hi.min(tile + n - 1));
                for r in 0..n_rep {
                    let row = i * n_rep + r;
                    let probs = &mut scores[row * KEY_TILE..row * KEY_TILE + n];
                    if a > b {
                        probs.fill(0.0);
                        continue;
                    }
                    let acc_row = &mut acc[row * hd..(row + 1) * hd];
                    self.softmax_step(&mut probs[a - tile..=b - tile], &mut max[row], &mut sum[row], acc_row);
                    probs[..a - tile].fill(0.0);
                    probs[b - tile + 1..].fill(0.0);
                }
            }
            // acc[rows, hd] += probabilities · values
            gemm_into(
                MatMut::rows(&mut acc, (rows, hd), hd),
                Mat::rows(&scores, (rows, n), KEY_TILE),
                Mat::rows(&values, (n, hd), hd),
                true,
            );
        }
        (acc, std::mem::take(sum))
    }

    /// The batch-invariant order: key tiles at multiples of `KEY_TILE` positions, and per row
    /// only its visible keys of each tile, scored and summed in order. A row's numbers depend
    /// on its query and keys only, not on which item (which other queries, which chunk) it
    /// came in. Returns the unnormalized outputs and each row's sum.
    fn tiles_per_row(&self, item: Item, mut item_rows: ItemRows) -> (Vec<f32>, Vec<f32>) {
        let hd = self.plan.dims.head_dim;
        let n_rep = self.plan.dims.num_heads / self.plan.dims.num_kv_heads;
        let (first_key, last_key) = item_rows.keys();
        let ItemRows { q, bounds, max, sum } = &mut item_rows;
        let mut acc = vec![0f32; item.queries * n_rep * hd];
        let mut scores = vec![0f32; KEY_TILE];
        let mut keys = vec![0f32; KEY_TILE * hd];
        let mut values = vec![0f32; KEY_TILE * hd];
        for tile in (first_key - first_key % KEY_TILE..=last_key).step_by(KEY_TILE) {
            let n = (tile + KEY_TILE).min(last_key + 1) - tile;
            self.widen_tile(item, tile, n, &mut keys, &mut values);
            for (i, &(lo, hi)) in bounds.iter().enumerate() {
                let (a, b) = (lo.max(tile), hi.min(tile + KEY_TILE - 1));
                if a > b {
                    continue;
                }
                let visible = (a - tile) * hd..(b - tile + 1) * hd;
                let (keys, values) = (&keys[visible.clone()], &values[visible]);
                for r in 0..n_rep {
                    let row = i * n_rep + r;
                    let probs = &mut scores[..=b - a];
                    dots_in_order(&q[row * hd..(row + 1) * hd], keys, probs);
                    let acc_row = &mut acc[row * hd..(row + 1) * hd];
                    self.softmax_step(probs, &mut max[row], &mut sum[row], acc_row);
                    add_weighted_in_order(acc_row, probs, values);
                }
            }
        }
        (acc, std::mem::take(sum))
    }

    /// The online softmax's update of one row over its visible scores of a tile: they become
    /// the numerators at the new running max, whose change rescales the row's sum and output.
    fn softmax_step(&self, visible: &mut [f32], max: &mut f32, sum: &mut f32, acc: &mut [f32]) {
        if let Some(cap) = self.opts.softcap {
            let cap = cap as f32;
            visible.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
        }
        let tile_max = visible.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let new_max = max.max(tile_max);
        let keep = exp(*max - new_max);
        *sum = *sum * keep + exp_shifted_sum(visible, new_max);
        *max = new_max;
        if keep != 1.0 {
            acc.iter_mut().for_each(|x| *x *= keep);
        }
    }
}

/// `scores[j] = q · keys[j]` (`keys` `[n, hd]`), each a sum in one fixed order: sixteen lanes
/// over the dimensions, then the lanes in order.
#[multiversion(targets = "simd")]
fn dots_in_order(q: &[f32], keys: &[f32], scores: &mut [f32]) {
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(q.len())) {
        let mut lanes = [0f32; 16];
        let (q_body, q_tail) = q.split_at(q.len() - q.len() % 16);
        let (k_body, k_tail) = key.split_at(q_body.len());
        for (x, y) in q_body.chunks_exact(16).zip(k_body.chunks_exact(16)) {
            for ((lane, &a), &b) in lanes.iter_mut().zip(x).zip(y) {
                *lane += a * b;
            }
        }
        for ((lane, &a), &b) in lanes.iter_mut().zip(q_tail).zip(k_tail) {
            *lane += a * b;
        }
        *score = lanes.iter().sum();
    }
}

/// `acc += Σ_j probs[j] · values[j]` (`values` `[n, hd]`), keys in order.
#[multiversion(targets = "simd")]
fn add_weighted_in_order(acc: &mut [f32], probs: &[f32], values: &[f32]) {
    for (&p, v) in probs.iter().zip(values.chunks_exact(acc.len())) {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += p * x;
        }
    }
}

/// A read-only matrix view: element (r, c) at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    shape: (usize, usize),
    strides: (usize, usize),
}

impl<'a> Mat<'a> {
    /// Rows stored one after another, `row_stride` apart.
    fn rows(data: &'a [f32], shape: (usize, usize), row_stride: usize) -> Self {
        Self::checked(data, shape, (row_stride, 1))
    }

    /// Columns stored one after another, `col_stride` apart (the transpose of [`Mat::rows`]).
    fn columns(data: &'a [f32], shape: (usize, usize), col_stride: usize) -> Self {
        Self::checked(data, shape, (1, col_stride))
    }

    fn checked(data: &'a [f32], shape: (usize, usize), strides: (usize, usize)) -> Self {
        let last = (shape.0.max(1) - 1) * strides.0 + (shape.1.max(1) - 1) * strides.1;
        assert!(
            last < data.len(),
            "a {shape:?} view with strides {strides:?} overruns {} values",
            data.len()
        );
        Self { data, shape, strides }
    }
}

/// A writable matrix view, rows `row_stride` apart.
struct MatMut<'a> {
    data: &'a mut [f32],
    shape: (usize, usize),
    row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// Rows stored one after another, `row_stride` apart.
    fn rows(data: &'a mut [f32], shape: (usize, usize), row_stride: usize) -> Self {
        Mat::rows(data, shape, row_stride);
        Self {
            data,
            shape,
            row_stride,
        }
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, on this thread (attention items
/// already run in parallel), with the `gemm` crate's SIMD kernels.
fn gemm_into(dst: MatMut, lhs: Mat, rhs: Mat, accumulate: bool) {
    let (m, k) = lhs.shape;
    let n = rhs.shape.1;
    assert!(
        rhs.shape.0 == k && dst.shape == (m, n),
        "gemm shapes {:?} · {:?} -> {:?}",
        lhs.shape,
        rhs.shape,
        dst.shape
    );
    // SAFETY: the three views were checked to lie inside their slices (`Mat::checked`), `dst`
    // is borrowed mutably and so overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.strides.1 as isize,
            lhs.strides.0 as isize,
            rhs.data.as_ptr(),
            rhs.strides.1 as isize,
            rhs.strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
