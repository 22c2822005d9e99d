//! The one paged attention path every model calls.
//!
//! 1. scatter this step's K/V rows into the layer's slots (`slot_mapping`);
//! 2. gather each sequence's whole context by `context_slots`;
//! 3. causal attention per sequence (grouped-query: query heads share their KV head).
//!
//! Per-sequence loops keep this portable across candle devices; a fused varlen kernel can
//! replace step 3 without touching the models.

use candle_core::{DType, Device, Result, Tensor, D};

use super::batch::BatchInput;
use super::paged_kv::LayerKv;

/// Per-forward attention bookkeeping, shared by all layers.
#[derive(Debug)]
pub struct AttentionMeta {
    scatter_index: Tensor,
    context_slots: Tensor,
    spans: Vec<SeqSpan>,
}

#[derive(Debug)]
struct SeqSpan {
    q_start: usize,
    q_len: usize,
    kv_start: usize,
    kv_len: usize,
    /// Additive causal mask `[q_len * n_rep, kv_len]`, only when `q_len > 1`.
    mask: Option<Tensor>,
}

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

impl AttentionMeta {
    /// Builds masks and scatter indices once per forward.
    pub fn new(batch: &BatchInput, dims: HeadDims, dtype: DType, device: &Device) -> Result<Self> {
        let kv_width = dims.num_kv_heads * dims.head_dim;
        let n_rep = dims.num_heads / dims.num_kv_heads;
        let num_tokens = batch.num_tokens();
        let scatter_index = batch
            .slot_mapping
            .unsqueeze(1)?
            .broadcast_as((num_tokens, kv_width))?
            .contiguous()?;
        let mut spans = Vec::with_capacity(batch.q_lens.len());
        let (mut q_start, mut kv_start) = (0, 0);
        for (&q_len, &kv_len) in batch.q_lens.iter().zip(&batch.kv_lens) {
            let mask = if q_len > 1 {
                Some(causal_mask(q_len, kv_len, n_rep, dtype, device)?)
            } else {
                None
            };
            spans.push(SeqSpan {
                q_start,
                q_len,
                kv_start,
                kv_len,
                mask,
            });
            q_start += q_len;
            kv_start += kv_len;
        }
        Ok(Self {
            scatter_index,
            context_slots: batch.context_slots.clone(),
            spans,
        })
    }
}

/// `[q_len * n_rep, kv_len]` additive mask: row `t * n_rep + r` is query position
/// `kv_len - q_len + t`, which may see keys `0..=` that position.
fn causal_mask(
    q_len: usize,
    kv_len: usize,
    n_rep: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let mut data = Vec::with_capacity(q_len * n_rep * kv_len);
    for t in 0..q_len {
        let row: Vec<f32> = (0..kv_len)
            .map(|j| {
                if j > offset + t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        for _ in 0..n_rep {
            data.extend_from_slice(&row);
        }
    }
    Tensor::from_vec(data, (q_len * n_rep, kv_len), device)?.to_dtype(dtype)
}

/// Writes this step's `k`/`v` (`[T, kv_heads, head_dim]`) into `kv` and attends `q`
/// (`[T, heads, head_dim]`) over each sequence's context. Returns `[T, heads * head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv: &mut LayerKv,
    meta: &AttentionMeta,
    scale: f64,
) -> Result<Tensor> {
    let (num_tokens, num_heads, head_dim) = q.dims3()?;
    let num_kv_heads = k.dim(1)?;
    let n_rep = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    // 1) write new K/V into their slots.
    kv.k.scatter_set(
        &meta.scatter_index,
        &k.reshape((num_tokens, kv_width))?.contiguous()?,
        0,
    )?;
    kv.v.scatter_set(
        &meta.scatter_index,
        &v.reshape((num_tokens, kv_width))?.contiguous()?,
        0,
    )?;
    // 2) gather every sequence's context.
    let k_ctx = kv.k.index_select(&meta.context_slots, 0)?;
    let v_ctx = kv.v.index_select(&meta.context_slots, 0)?;
    // 3) attention per sequence.
    let mut outputs = Vec::with_capacity(meta.spans.len());
    for span in &meta.spans {
        let q_i = q
            .narrow(0, span.q_start, span.q_len)?
            .reshape((span.q_len, num_kv_heads, n_rep, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((num_kv_heads, span.q_len * n_rep, head_dim))?;
        let k_i = k_ctx
            .narrow(0, span.kv_start, span.kv_len)?
            .reshape((span.kv_len, num_kv_heads, head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let v_i = v_ctx
            .narrow(0, span.kv_start, span.kv_len)?
            .reshape((span.kv_len, num_kv_heads, head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let mut scores = (q_i.matmul(&k_i.t()?)? * scale)?;
        if let Some(mask) = &span.mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        let o = probs
            .matmul(&v_i)?
            .reshape((num_kv_heads, span.q_len, n_rep, head_dim))?
            .transpose(0, 1)?
            .reshape((span.q_len, num_heads * head_dim))?;
        outputs.push(o);
    }
    let out = Tensor::cat(&outputs, 0)?;
    debug_assert_eq!(out.dim(D::Minus1)?, num_heads * head_dim);
    Ok(out)
}
