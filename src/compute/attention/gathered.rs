//! The portable attention path, in plain candle ops (CPU, Metal):
//!
//! 1. scatter this step's K/V rows into the layer's slots (`slot_mapping`);
//! 2. gather each sequence's whole context by `context_slots`;
//! 3. causal attention (grouped-query: query heads share their KV head), optionally limited
//!    to a sliding window and with tanh soft-capping of the scores: every single-token
//!    sequence in one padded, masked batched matmul, every multi-token chunk in another, a lone
//!    sequence of either kind by itself;
//! 4. one gather puts the outputs back in token order.
//!
//! On CUDA the kernels of `models::cuda` replace all of this (see `attention/mod.rs`).

use candle_core::{DType, Device, Result, Tensor};

use super::{AttentionOpts, HeadDims, SlotWriter};
use crate::compute::batch::BatchInput;
use crate::compute::paged_kv::LayerKv;

/// What one sequence sees under one window setting.
#[derive(Debug)]
struct WindowView {
    window: Option<usize>,
    /// First visible key position of any query in the span.
    kv_lo: usize,
    /// Additive mask `[q_len * n_rep, kv_len - kv_lo]`, only when `q_len > 1` and the
    /// sequence is attended alone.
    mask: Option<Tensor>,
    /// The mask's geometry.
    shape: MaskShape,
}

#[derive(Debug)]
struct SeqSpan {
    q_start: usize,
    q_len: usize,
    kv_start: usize,
    kv_len: usize,
    views: Vec<WindowView>,
    /// Per query, the last position it sees (None: causal; see `ImageRows::last_visible`).
    last_visible: Option<Vec<usize>>,
}

impl SeqSpan {
    /// The last key position query `t` of the span sees.
    fn last_key(&self, t: usize) -> usize {
        let p = self.kv_len - self.q_len + t;
        self.last_visible.as_ref().map_or(p, |l| l[t].clamp(p, self.kv_len - 1))
    }
}

/// Per-forward bookkeeping of the gathered path, shared by all layers.
#[derive(Debug)]
pub struct GatheredPlan {
    dims: HeadDims,
    slots: SlotWriter,
    context_slots: Tensor,
    spans: Vec<SeqSpan>,
    /// Single-token (decode) sequences attended together, one entry per window setting.
    decode: Vec<DecodeBatch>,
    /// Multi-token (prefill chunk) sequences attended together, one entry per window setting.
    prefill: Vec<PrefillBatch>,
    /// Per window setting: how the batched outputs are put back in token order (see
    /// `Assembly`).
    assembly: Vec<Assembly>,
}

/// Where each sequence's attention output lands when the batched parts (decode batch, prefill
/// batch, then the lone sequences, in that order) are concatenated, and the one gather that
/// restores token order: one copy instead of one per sequence.
#[derive(Debug)]
struct Assembly {
    window: Option<usize>,
    /// `[T]` u32: row of the concatenated parts for each token row; None when already in order.
    order: Option<Tensor>,
}

/// Every multi-token (prefill chunk) sequence of the batch under one window setting, padded to
/// the longest chunk and the longest visible context, attended in one batched matmul instead of
/// one loop turn each.
#[derive(Debug)]
struct PrefillBatch {
    window: Option<usize>,
    /// Indices into `spans` of the prefill sequences, in batch order.
    span_ids: Vec<usize>,
    /// `[B * max_q]` u32: query rows; padding repeats the sequence's first row.
    q_rows: Tensor,
    /// `[B * max_visible]` u32: rows of the gathered context; padding repeats a valid row.
    kv_rows: Tensor,
    /// `[B, 1, max_q, 1, max_visible]` (broadcast over KV heads and the query heads sharing
    /// one): 0 for visible keys, -inf otherwise; a padding query row sees key 0 only (its
    /// output is dropped; an all -inf row would be NaN).
    mask: Tensor,
    /// `[sum q_len]` u32: the padded output row of each real query row, in batch order.
    out_rows: Tensor,
    max_q: usize,
    max_visible: usize,
}

impl PrefillBatch {
    fn build(spans: &[SeqSpan], window_index: usize, device: &Device) -> Result<Option<Self>> {
        let span_ids: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].q_len > 1).collect();
        if span_ids.len() < 2 {
            return Ok(None);
        }
        let view = |i: usize| &spans[i].views[window_index];
        let window = view(span_ids[0]).window;
        let visible = |i: usize| spans[i].kv_len - view(i).kv_lo;
        let max_visible = span_ids.iter().map(|&i| visible(i)).max().unwrap_or(0);
        let max_q = span_ids.iter().map(|&i| spans[i].q_len).max().unwrap_or(0);
        let b = span_ids.len();
        // A CPU is compute-bound: padding chunks of very different lengths to the longest costs
        // more than the per-sequence launches it saves, so it batches only well-matched chunks.
        // A GPU is launch-bound and always batches.
        let real: usize = span_ids.iter().map(|&i| spans[i].q_len * visible(i)).sum();
        if device.is_cpu() && 2 * b * max_q * max_visible > 3 * real {
            return Ok(None);
        }
        let (mut q_rows, mut kv_rows, mut out_rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut mask = Vec::with_capacity(b * max_q * max_visible);
        for (slot, &i) in span_ids.iter().enumerate() {
            let span = &spans[i];
            let kv_lo = view(i).kv_lo;
            let first_kv = (span.kv_start + kv_lo) as u32;
            for j in 0..max_visible {
                kv_rows.push(if j < visible(i) { first_kv + j as u32 } else { first_kv });
            }
            for t in 0..max_q {
                let real = t < span.q_len;
                q_rows.push((span.q_start + if real { t } else { 0 }) as u32);
                if real {
                    out_rows.push((slot * max_q + t) as u32);
                }
                let p = span.kv_len - span.q_len + t;
                let last = if real { span.last_key(t) } else { p };
                mask.extend((0..max_visible).map(|jj| {
                    let key = kv_lo + jj;
                    let seen = if real {
                        jj < visible(i) && key <= last && (key > p || window.is_none_or(|w| p - key < w))
                    } else {
                        jj == 0
                    };
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let n_out = out_rows.len();
        Ok(Some(Self {
            window,
            q_rows: Tensor::from_vec(q_rows, b * max_q, device)?,
            kv_rows: Tensor::from_vec(kv_rows, b * max_visible, device)?,
            mask: Tensor::from_vec(mask, (b, 1, max_q, 1, max_visible), device)?,
            out_rows: Tensor::from_vec(out_rows, n_out, device)?,
            span_ids,
            max_q,
            max_visible,
        }))
    }
}

impl Assembly {
    /// The order for `window`: decode batch rows, prefill batch rows, then lone sequences.
    fn build(
        spans: &[SeqSpan],
        window: Option<usize>,
        decode: Option<&DecodeBatch>,
        prefill: Option<&PrefillBatch>,
        device: &Device,
    ) -> Result<Self> {
        let mut start = vec![usize::MAX; spans.len()];
        let mut next = 0;
        for ids in [decode.map(|d| &d.span_ids), prefill.map(|p| &p.span_ids)]
            .into_iter()
            .flatten()
        {
            for &i in ids {
                start[i] = next;
                next += spans[i].q_len;
            }
        }
        for (i, span) in spans.iter().enumerate() {
            if start[i] == usize::MAX {
                start[i] = next;
                next += span.q_len;
            }
        }
        let order: Vec<u32> = spans
            .iter()
            .enumerate()
            .flat_map(|(i, span)| (start[i]..start[i] + span.q_len).map(|r| r as u32))
            .collect();
        let in_order = order.iter().enumerate().all(|(k, &r)| k as u32 == r);
        let n = order.len();
        Ok(Self {
            window,
            order: (!in_order).then(|| Tensor::from_vec(order, n, device)).transpose()?,
        })
    }
}

/// Every single-token sequence of the batch under one window setting, padded to the longest
/// visible context so all of them attend in one batched matmul instead of one loop turn each.
#[derive(Debug)]
struct DecodeBatch {
    window: Option<usize>,
    /// Indices into `spans` of the decode sequences, in batch order.
    span_ids: Vec<usize>,
    /// `[B]` u32: each decode sequence's query row.
    q_rows: Tensor,
    /// `[B * max_visible]` u32: rows of the gathered context, padding repeats a valid row.
    kv_rows: Tensor,
    /// `[B, 1, 1, max_visible]`: 0 for visible keys, -inf for padding.
    mask: Tensor,
    max_visible: usize,
}

impl DecodeBatch {
    fn build(spans: &[SeqSpan], window_index: usize, device: &Device) -> Result<Option<Self>> {
        let span_ids: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].q_len == 1).collect();
        if span_ids.len() < 2 {
            return Ok(None);
        }
        let view = |i: usize| &spans[i].views[window_index];
        let visible = |i: usize| spans[i].kv_len - view(i).kv_lo;
        let max_visible = span_ids.iter().map(|&i| visible(i)).max().unwrap_or(0);
        let (mut kv_rows, mut mask) = (Vec::new(), Vec::new());
        for &i in &span_ids {
            let first = (spans[i].kv_start + view(i).kv_lo) as u32;
            for j in 0..max_visible {
                let inside = j < visible(i);
                kv_rows.push(if inside { first + j as u32 } else { first });
                mask.push(if inside { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let b = span_ids.len();
        let q_rows: Vec<u32> = span_ids.iter().map(|&i| spans[i].q_start as u32).collect();
        Ok(Some(Self {
            window: view(span_ids[0]).window,
            q_rows: Tensor::from_vec(q_rows, b, device)?,
            kv_rows: Tensor::from_vec(kv_rows, b * max_visible, device)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, max_visible), device)?,
            span_ids,
            max_visible,
        }))
    }
}

impl GatheredPlan {
    /// The head layout the plan was built for.
    pub fn dims(&self) -> HeadDims {
        self.dims
    }

    /// Where this step's K/V rows go.
    pub(super) fn slots(&self) -> &SlotWriter {
        &self.slots
    }

    /// Builds scatter indices and the masks of every window setting the model uses, once per
    /// forward.
    pub fn new(batch: &BatchInput, dims: HeadDims, windows: &[Option<usize>], dtype: DType) -> Result<Self> {
        let device = batch.slot_mapping.device();
        let n_rep = dims.num_heads / dims.num_kv_heads;
        let mut spans = Vec::with_capacity(batch.q_lens.len());
        let (mut q_start, mut kv_start) = (0, 0);
        for (&q_len, &kv_len) in batch.q_lens.iter().zip(&batch.kv_lens) {
            let views = windows
                .iter()
                .map(|&window| {
                    let first_query = kv_len - q_len;
                    let kv_lo = window.map_or(0, |w| (first_query + 1).saturating_sub(w));
                    let shape = MaskShape {
                        q_len,
                        kv_len,
                        kv_lo,
                        window,
                        n_rep,
                    };
                    Ok(WindowView {
                        window,
                        kv_lo,
                        mask: None,
                        shape,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let last_visible = batch.images.as_ref().map(|i| {
                i.last_visible[q_start..q_start + q_len]
                    .iter()
                    .map(|&p| p as usize)
                    .collect()
            });
            spans.push(SeqSpan {
                q_start,
                q_len,
                kv_start,
                kv_len,
                views,
                last_visible,
            });
            q_start += q_len;
            kv_start += kv_len;
        }
        let decode: Vec<DecodeBatch> = (0..windows.len())
            .map(|w| DecodeBatch::build(&spans, w, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let prefill: Vec<PrefillBatch> = (0..windows.len())
            .map(|w| PrefillBatch::build(&spans, w, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        // Masks of the multi-token sequences attended alone (not in a prefill batch).
        for (i, span) in spans.iter_mut().enumerate() {
            for view in span.views.iter_mut().filter(|_| span.q_len > 1) {
                let batched = prefill
                    .iter()
                    .any(|p| p.window == view.window && p.span_ids.contains(&i));
                if !batched {
                    view.mask = Some(view.shape.build(span.last_visible.as_deref(), dtype, device)?);
                }
            }
        }
        let assembly = windows
            .iter()
            .map(|&w| {
                let d = decode.iter().find(|d| d.window == w);
                let p = prefill.iter().find(|p| p.window == w);
                Assembly::build(&spans, w, d, p, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dims,
            slots: SlotWriter::new(batch, dims)?,
            context_slots: batch.context_slots.clone(),
            spans,
            decode,
            prefill,
            assembly,
        })
    }
}

/// Geometry of one sequence's additive attention mask.
#[derive(Clone, Copy, Debug)]
struct MaskShape {
    q_len: usize,
    kv_len: usize,
    kv_lo: usize,
    window: Option<usize>,
    n_rep: usize,
}

impl MaskShape {
    /// Mask over keys `kv_lo..kv_len`: row `t * n_rep + r` is query position
    /// `p = kv_len - q_len + t`, which sees key `j` iff `j <= p` and (with a window) `p - j < w`;
    /// with `last_visible`, query `t` also sees the keys after it up to `last_visible[t]`.
    fn build(&self, last_visible: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let Self {
            q_len,
            kv_len,
            kv_lo,
            window,
            n_rep,
        } = *self;
        let width = kv_len - kv_lo;
        let mut data = Vec::with_capacity(q_len * n_rep * width);
        for t in 0..q_len {
            let p = kv_len - q_len + t;
            let last = last_visible.map_or(p, |l| l[t].clamp(p, kv_len - 1));
            let row: Vec<f32> = (kv_lo..kv_len)
                .map(|j| {
                    let visible = j <= last && (j > p || window.is_none_or(|w| p - j < w));
                    if visible {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            for _ in 0..n_rep {
                data.extend_from_slice(&row);
            }
        }
        Tensor::from_vec(data, (q_len * n_rep, width), device)?.to_dtype(dtype)
    }
}

/// Soft-capping, masking and softmax of raw scores, in f32. `sinks` (shaped to broadcast over
/// the scores but one wide) join the softmax as extra keys whose probabilities are dropped.
fn softmax_scores(
    scores: Tensor,
    mask: Option<&Tensor>,
    softcap: Option<f64>,
    sinks: Option<Tensor>,
) -> Result<Tensor> {
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    let Some(sinks) = sinks else {
        return candle_nn::ops::softmax_last_dim(&scores);
    };
    let mut column = scores.dims().to_vec();
    let keys = column.pop().expect("scores have a key axis");
    column.push(1);
    let last = column.len() - 1;
    let with_sinks = Tensor::cat(&[&scores, &sinks.to_dtype(DType::F32)?.broadcast_as(column)?], last)?;
    candle_nn::ops::softmax_last_dim(&with_sinks.contiguous()?)?.narrow(last, 0, keys)
}

/// The sinks (`[heads]`, head = KV head · n_rep + rep) shaped as `shape`, whose axes of size
/// `kv_heads` and `n_rep` are at `axes` and the rest 1.
fn sinks_as(opts: &AttentionOpts, shape: &[usize], axes: (usize, usize)) -> Result<Option<Tensor>> {
    let Some(sinks) = &opts.sinks else {
        return Ok(None);
    };
    let mut dims = vec![1; shape.len()];
    (dims[axes.0], dims[axes.1]) = (shape[axes.0], shape[axes.1]);
    sinks.reshape(dims).map(Some)
}

/// Attention of every single-token sequence at once: `[B, heads * head_dim]` in batch order.
fn attend_decode_batch(
    q: &Tensor,
    num_kv_heads: usize,
    (k_ctx, v_ctx): (&Tensor, &Tensor),
    d: &DecodeBatch,
    opts: &AttentionOpts,
) -> Result<Tensor> {
    let (_, num_heads, head_dim) = q.dims3()?;
    let n_rep = num_heads / num_kv_heads;
    let b = d.span_ids.len();
    let heads_of = |ctx: &Tensor| -> Result<Tensor> {
        ctx.index_select(&d.kv_rows, 0)?
            .reshape((b, d.max_visible, num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (heads_of(k_ctx)?, heads_of(v_ctx)?);
    let q = q
        .contiguous()?
        .index_select(&d.q_rows, 0)?
        .reshape((b, num_kv_heads, n_rep, head_dim))?;
    let scores = (q.matmul(&k.transpose(2, 3)?)? * opts.scale)?;
    let sinks = sinks_as(opts, &[b, num_kv_heads, n_rep, 1], (1, 2))?;
    let probs = softmax_scores(scores, Some(&d.mask), opts.softcap, sinks)?.to_dtype(q.dtype())?;
    probs.matmul(&v)?.reshape((b, num_heads * head_dim))
}

/// Attention of every multi-token sequence at once: `[sum q_len, heads * head_dim]`, the
/// sequences in batch order.
fn attend_prefill_batch(
    q: &Tensor,
    num_kv_heads: usize,
    (k_ctx, v_ctx): (&Tensor, &Tensor),
    p: &PrefillBatch,
    opts: &AttentionOpts,
) -> Result<Tensor> {
    let (_, num_heads, head_dim) = q.dims3()?;
    let n_rep = num_heads / num_kv_heads;
    let b = p.span_ids.len();
    let heads_of = |ctx: &Tensor| -> Result<Tensor> {
        ctx.index_select(&p.kv_rows, 0)?
            .reshape((b, p.max_visible, num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (heads_of(k_ctx)?, heads_of(v_ctx)?);
    // [B * Q, heads, d] → [B, kv_heads, Q * n_rep, d] (rows t * n_rep + r, as the mask).
    let q = q
        .contiguous()?
        .index_select(&p.q_rows, 0)?
        .reshape((b, p.max_q, num_kv_heads, n_rep, head_dim))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, num_kv_heads, p.max_q * n_rep, head_dim))?;
    let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * opts.scale)?.reshape((
        b,
        num_kv_heads,
        p.max_q,
        n_rep,
        p.max_visible,
    ))?;
    let sinks = sinks_as(opts, &[b, num_kv_heads, p.max_q, n_rep, 1], (1, 3))?;
    let probs = softmax_scores(scores, Some(&p.mask), opts.softcap, sinks)?
        .to_dtype(q.dtype())?
        .reshape((b, num_kv_heads, p.max_q * n_rep, p.max_visible))?;
    probs
        .matmul(&v)?
        .reshape((b, num_kv_heads, p.max_q, n_rep, head_dim))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * p.max_q, num_heads * head_dim))?
        .index_select(&p.out_rows, 0)
}

/// Attends every sequence's queries (`[T, heads, head_dim]`, rotated) over its context.
/// Returns `[T, heads * head_dim]`.
pub fn attend(q: &Tensor, kv: &LayerKv, plan: &GatheredPlan, opts: &AttentionOpts) -> Result<Tensor> {
    let HeadDims {
        num_heads,
        num_kv_heads,
        head_dim,
    } = plan.dims;
    let n_rep = num_heads / num_kv_heads;
    // 2) gather every sequence's context.
    let k_ctx = kv.k.index_select(&plan.context_slots, 0)?;
    let v_ctx = kv.v.index_select(&plan.context_slots, 0)?;
    // 3) all single-token sequences in one batched pass, all multi-token ones in another, the
    //    lone rest one by one; 4) one gather puts the rows back in token order.
    let decode = plan.decode.iter().find(|d| d.window == opts.window);
    let prefill = plan.prefill.iter().find(|p| p.window == opts.window);
    let mut parts = Vec::new();
    let mut batched = vec![false; plan.spans.len()];
    if let Some(d) = decode {
        parts.push(attend_decode_batch(q, num_kv_heads, (&k_ctx, &v_ctx), d, opts)?);
        d.span_ids.iter().for_each(|&i| batched[i] = true);
    }
    if let Some(p) = prefill {
        parts.push(attend_prefill_batch(q, num_kv_heads, (&k_ctx, &v_ctx), p, opts)?);
        p.span_ids.iter().for_each(|&i| batched[i] = true);
    }
    for (i, span) in plan.spans.iter().enumerate() {
        if batched[i] {
            continue;
        }
        let view = span
            .views
            .iter()
            .find(|v| v.window == opts.window)
            .expect("invariant: GatheredPlan was built with every window the model uses");
        let visible = span.kv_len - view.kv_lo;
        let heads_of = |ctx: &Tensor| -> Result<Tensor> {
            ctx.narrow(0, span.kv_start + view.kv_lo, visible)?
                .reshape((visible, num_kv_heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k_i, v_i) = (heads_of(&k_ctx)?, heads_of(&v_ctx)?);
        let q_i = q
            .narrow(0, span.q_start, span.q_len)?
            .reshape((span.q_len, num_kv_heads, n_rep, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((num_kv_heads, span.q_len * n_rep, head_dim))?;
        let scores = (q_i.matmul(&k_i.t()?)? * opts.scale)?;
        let probs = match sinks_as(opts, &[num_kv_heads, span.q_len, n_rep, 1], (0, 2))? {
            // [kv_heads, q_len · n_rep, keys] → one axis per head index for the sinks.
            Some(sinks) => {
                let keys = scores.dim(2)?;
                let scores = scores.reshape((num_kv_heads, span.q_len, n_rep, keys))?;
                let mask = view
                    .mask
                    .as_ref()
                    .map(|m| m.reshape((span.q_len, n_rep, keys)))
                    .transpose()?;
                softmax_scores(scores, mask.as_ref(), opts.softcap, Some(sinks))?.reshape((
                    num_kv_heads,
                    span.q_len * n_rep,
                    keys,
                ))?
            }
            None => softmax_scores(scores, view.mask.as_ref(), opts.softcap, None)?,
        }
        .to_dtype(q.dtype())?;
        let o = probs
            .matmul(&v_i)?
            .reshape((num_kv_heads, span.q_len, n_rep, head_dim))?
            .transpose(0, 1)?
            .reshape((span.q_len, num_heads * head_dim))?;
        parts.push(o);
    }
    let all = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 0)?
    };
    let assembly = plan
        .assembly
        .iter()
        .find(|a| a.window == opts.window)
        .expect("invariant: GatheredPlan was built with every window the model uses");
    match &assembly.order {
        Some(order) => all.index_select(order, 0),
        None => Ok(all),
    }
}
