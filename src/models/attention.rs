//! The one paged attention path every model calls.
//!
//! 1. scatter this step's K/V rows into the layer's slots (`slot_mapping`);
//! 2. gather each sequence's whole context by `context_slots`;
//! 3. causal attention per sequence (grouped-query: query heads share their KV head),
//!    optionally limited to a sliding window and with tanh soft-capping of the scores.
//!
//! Per-sequence loops keep this portable across candle devices; a fused varlen kernel can
//! replace step 3 without touching the models.

use candle_core::{DType, Device, Result, Tensor};

use super::batch::BatchInput;
use super::paged_kv::LayerKv;

/// Head layout of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct HeadDims {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
}

/// How one layer attends.
#[derive(Clone, Copy, Debug)]
pub struct AttentionOpts {
    /// Multiplier of q·k (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Attend only to the last `window` positions (query included).
    pub window: Option<usize>,
    /// `cap · tanh(score / cap)` before masking.
    pub softcap: Option<f64>,
}

/// This step's projected queries, keys and values, `[T, heads, head_dim]` each.
pub struct Qkv {
    /// Queries (already rotated).
    pub q: Tensor,
    /// Keys (already rotated).
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

/// What one sequence sees under one window setting.
#[derive(Debug)]
struct WindowView {
    window: Option<usize>,
    /// First visible key position of any query in the span.
    kv_lo: usize,
    /// Additive mask `[q_len * n_rep, kv_len - kv_lo]`, only when `q_len > 1`.
    mask: Option<Tensor>,
}

#[derive(Debug)]
struct SeqSpan {
    q_start: usize,
    q_len: usize,
    kv_start: usize,
    kv_len: usize,
    views: Vec<WindowView>,
}

/// Per-forward attention bookkeeping, shared by all layers.
#[derive(Debug)]
pub struct AttentionMeta {
    scatter_index: Tensor,
    context_slots: Tensor,
    spans: Vec<SeqSpan>,
    /// Single-token (decode) sequences attended together, one entry per window setting.
    decode: Vec<DecodeBatch>,
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

impl AttentionMeta {
    /// Builds scatter indices and the masks of every window setting the model uses, once per
    /// forward.
    pub fn new(batch: &BatchInput, dims: HeadDims, windows: &[Option<usize>], dtype: DType) -> Result<Self> {
        let device = batch.slot_mapping.device();
        let kv_width = dims.num_kv_heads * dims.head_dim;
        let n_rep = dims.num_heads / dims.num_kv_heads;
        let scatter_index = batch
            .slot_mapping
            .unsqueeze(1)?
            .broadcast_as((batch.num_tokens(), kv_width))?
            .contiguous()?;
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
                    let mask = if q_len > 1 {
                        Some(shape.build(dtype, device)?)
                    } else {
                        None
                    };
                    Ok(WindowView { window, kv_lo, mask })
                })
                .collect::<Result<Vec<_>>>()?;
            spans.push(SeqSpan {
                q_start,
                q_len,
                kv_start,
                kv_len,
                views,
            });
            q_start += q_len;
            kv_start += kv_len;
        }
        let decode = (0..windows.len())
            .map(|w| DecodeBatch::build(&spans, w, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        Ok(Self {
            scatter_index,
            context_slots: batch.context_slots.clone(),
            spans,
            decode,
        })
    }
}

/// Geometry of one sequence's additive attention mask.
struct MaskShape {
    q_len: usize,
    kv_len: usize,
    kv_lo: usize,
    window: Option<usize>,
    n_rep: usize,
}

impl MaskShape {
    /// Mask over keys `kv_lo..kv_len`: row `t * n_rep + r` is query position
    /// `p = kv_len - q_len + t`, which sees key `j` iff `j <= p` and (with a window) `p - j < w`.
    fn build(&self, dtype: DType, device: &Device) -> Result<Tensor> {
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
            let row: Vec<f32> = (kv_lo..kv_len)
                .map(|j| {
                    let visible = j <= p && window.is_none_or(|w| p - j < w);
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

/// Soft-capping, masking and softmax of raw scores, in f32.
fn softmax_scores(scores: Tensor, mask: Option<&Tensor>, softcap: Option<f64>) -> Result<Tensor> {
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Attention of every single-token sequence at once: `[B, heads * head_dim]` in batch order.
fn attend_decode_batch(
    qkv: &Qkv,
    (k_ctx, v_ctx): (&Tensor, &Tensor),
    d: &DecodeBatch,
    opts: AttentionOpts,
) -> Result<Tensor> {
    let (_, num_heads, head_dim) = qkv.q.dims3()?;
    let num_kv_heads = qkv.k.dim(1)?;
    let n_rep = num_heads / num_kv_heads;
    let b = d.span_ids.len();
    let heads_of = |ctx: &Tensor| -> Result<Tensor> {
        ctx.index_select(&d.kv_rows, 0)?
            .reshape((b, d.max_visible, num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (heads_of(k_ctx)?, heads_of(v_ctx)?);
    let q = qkv
        .q
        .contiguous()?
        .index_select(&d.q_rows, 0)?
        .reshape((b, num_kv_heads, n_rep, head_dim))?;
    let scores = (q.matmul(&k.transpose(2, 3)?)? * opts.scale)?;
    let probs = softmax_scores(scores, Some(&d.mask), opts.softcap)?.to_dtype(qkv.q.dtype())?;
    probs.matmul(&v)?.reshape((b, num_heads * head_dim))
}

/// Writes this step's K/V into `kv` and attends every sequence's queries over its context.
/// Returns `[T, heads * head_dim]`.
pub fn paged_attention(qkv: &Qkv, kv: &mut LayerKv, meta: &AttentionMeta, opts: AttentionOpts) -> Result<Tensor> {
    let (num_tokens, num_heads, head_dim) = qkv.q.dims3()?;
    let num_kv_heads = qkv.k.dim(1)?;
    let n_rep = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    // 1) write new K/V into their slots.
    let k_rows = qkv.k.reshape((num_tokens, kv_width))?.contiguous()?;
    let v_rows = qkv.v.reshape((num_tokens, kv_width))?.contiguous()?;
    kv.k.scatter_set(&meta.scatter_index, &k_rows, 0)?;
    kv.v.scatter_set(&meta.scatter_index, &v_rows, 0)?;
    // 2) gather every sequence's context.
    let k_ctx = kv.k.index_select(&meta.context_slots, 0)?;
    let v_ctx = kv.v.index_select(&meta.context_slots, 0)?;
    // 3) all single-token sequences in one batched pass, the others one by one.
    let decode = meta.decode.iter().find(|d| d.window == opts.window);
    let decoded = decode
        .map(|d| attend_decode_batch(qkv, (&k_ctx, &v_ctx), d, opts))
        .transpose()?;
    let mut outputs = Vec::with_capacity(meta.spans.len());
    for (i, span) in meta.spans.iter().enumerate() {
        if let (Some(d), Some(out)) = (decode, &decoded) {
            if let Some(pos) = d.span_ids.iter().position(|&s| s == i) {
                outputs.push(out.narrow(0, pos, 1)?);
                continue;
            }
        }
        let view = span
            .views
            .iter()
            .find(|v| v.window == opts.window)
            .expect("invariant: AttentionMeta was built with every window the model uses");
        let visible = span.kv_len - view.kv_lo;
        let heads_of = |ctx: &Tensor| -> Result<Tensor> {
            ctx.narrow(0, span.kv_start + view.kv_lo, visible)?
                .reshape((visible, num_kv_heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k_i, v_i) = (heads_of(&k_ctx)?, heads_of(&v_ctx)?);
        let q_i = qkv
            .q
            .narrow(0, span.q_start, span.q_len)?
            .reshape((span.q_len, num_kv_heads, n_rep, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((num_kv_heads, span.q_len * n_rep, head_dim))?;
        let scores = (q_i.matmul(&k_i.t()?)? * opts.scale)?;
        let probs = softmax_scores(scores, view.mask.as_ref(), opts.softcap)?.to_dtype(qkv.q.dtype())?;
        let o = probs
            .matmul(&v_i)?
            .reshape((num_kv_heads, span.q_len, n_rep, head_dim))?
            .transpose(0, 1)?
            .reshape((span.q_len, num_heads * head_dim))?;
        outputs.push(o);
    }
    Tensor::cat(&outputs, 0)
}
