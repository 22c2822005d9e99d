//! The one paged attention path every model calls, in two steps per layer:
//!
//! 1. [`store_kv`]: bias, per-head q/k norms and rope on this step's projections; K and V are
//!    written into their KV slots (`slot_mapping`) and the rotated queries returned;
//! 2. [`attend`]: causal attention of every query over its sequence's context (grouped-query:
//!    query heads share their KV head), optionally limited to a sliding window and with tanh
//!    soft-capping of the scores.
//!
//! Two implementations behind one [`AttentionMeta`]: on CUDA, mlxd's kernels (through
//! `models::fused`) do step 1 in one launch and step 2 in another, reading K/V from the cache
//! in place; on other devices (CPU, Metal) `gathered` does both in plain candle ops, gathering
//! each context first.

mod gathered;

use candle_core::{DType, Result, Tensor};

use super::batch::BatchInput;
use super::fused::KernelAttention;
use super::layers::{RmsNorm, RotaryAtPositions};
use super::paged_kv::LayerKv;
use gathered::GatheredPlan;

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

/// This step's q, k and v projections before bias, norms and rope: `[T, heads * head_dim]`
/// views (rows contiguous; they may be column ranges of one fused projection).
pub struct Projected<'a> {
    /// Queries.
    pub q: Tensor,
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
    /// `[(q + k + v widths)]` bias still to add (fused projections keep it out of the matmul).
    pub bias: Option<Tensor>,
    /// The layer's per-head norms of q and k, if it has them.
    pub norms: Option<HeadNorms<'a>>,
}

/// The per-head RMSNorms of q and k (Qwen3, Gemma 3).
#[derive(Clone, Copy)]
pub struct HeadNorms<'a> {
    /// `q_norm`.
    pub q: &'a RmsNorm,
    /// `k_norm`.
    pub k: &'a RmsNorm,
}

/// Per-forward attention bookkeeping, shared by all layers.
#[derive(Debug)]
pub struct AttentionMeta {
    plan: Plan,
}

#[derive(Debug)]
enum Plan {
    /// mlxd's CUDA kernels.
    Kernels(KernelAttention),
    /// Plain candle ops.
    Gathered(GatheredPlan),
}

impl AttentionMeta {
    /// Builds what every layer of this forward needs: the kernels' plan on CUDA, otherwise the
    /// scatter indices and masks of every window setting the model uses.
    pub fn new(batch: &BatchInput, dims: HeadDims, windows: &[Option<usize>], dtype: DType) -> Result<Self> {
        if let Some(kernels) = KernelAttention::plan(batch, dims)? {
            return Ok(Self {
                plan: Plan::Kernels(kernels),
            });
        }
        if batch.fixed.is_some() {
            candle_core::bail!("a batch in fixed device buffers needs mlxd's CUDA attention kernels");
        }
        Ok(Self {
            plan: Plan::Gathered(GatheredPlan::new(batch, dims, windows, dtype)?),
        })
    }
}

/// Step 1: adds the bias, applies the head norms and rope, writes K and V into their slots and
/// returns the rotated queries `[T, heads, head_dim]`.
pub fn store_kv(p: &Projected, rope: &RotaryAtPositions, kv: &mut LayerKv, meta: &AttentionMeta) -> Result<Tensor> {
    match &meta.plan {
        Plan::Kernels(kernels) => kernels.store_kv(p, rope, kv),
        Plan::Gathered(plan) => {
            let HeadDims {
                num_heads,
                num_kv_heads,
                head_dim,
            } = plan.dims();
            let t = p.q.dim(0)?;
            let (q_w, kv_w) = (num_heads * head_dim, num_kv_heads * head_dim);
            let with_bias = |x: &Tensor, start: usize, len: usize| -> Result<Tensor> {
                match &p.bias {
                    Some(b) => x.broadcast_add(&b.narrow(0, start, len)?),
                    None => Ok(x.clone()),
                }
            };
            let mut q = with_bias(&p.q, 0, q_w)?.reshape((t, num_heads, head_dim))?;
            let mut k = with_bias(&p.k, q_w, kv_w)?.reshape((t, num_kv_heads, head_dim))?;
            let v = with_bias(&p.v, q_w + kv_w, kv_w)?;
            if let Some(n) = p.norms {
                q = n.q.forward(&q)?;
                k = n.k.forward(&k)?;
            }
            let q = rope.apply(&q)?;
            let k = rope.apply(&k)?.reshape((t, kv_w))?;
            gathered::store(&k, &v, kv, plan)?;
            Ok(q)
        }
    }
}

/// Step 2: attends every sequence's rotated queries (`[T, heads, head_dim]`) over its context.
/// Returns `[T, heads * head_dim]`.
pub fn attend(q: &Tensor, kv: &LayerKv, meta: &AttentionMeta, opts: AttentionOpts) -> Result<Tensor> {
    match &meta.plan {
        Plan::Kernels(kernels) => kernels.attend(q, kv, opts),
        Plan::Gathered(plan) => gathered::attend(q, kv, plan, opts),
    }
}
