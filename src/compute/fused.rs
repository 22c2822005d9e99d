//! Where model code (and the engine's sampler) meets mlxd's CUDA kernels (`models::cuda`).
//! Each entry point runs its fused kernel when the tensors live on a CUDA device of a `cuda`
//! build, and otherwise answers None so the caller does the same work with candle ops or on
//! the host. The one place models see `cfg(feature = "cuda")`.

use candle_core::Device;

pub use imp::*;

/// True when tensors on `device` go through mlxd's own fused CUDA kernels (`compute::cuda`)
/// instead of chains of candle ops: a CUDA device in a `cuda` build.
pub fn runs_kernels(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// One row for the device sampler: the request's parameters, this step's uniform draw from
/// its seeded RNG, and the per-token adjustments its penalties and logit bias make.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSampleRow {
    /// ≤ 0: greedy.
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: u32,
    /// 1: no nucleus.
    pub top_p: f32,
    /// 0: no min-p.
    pub min_p: f32,
    /// In [0, 1): where in the kept mass the token falls.
    pub uniform: f32,
    /// Divides positive and multiplies negative logits of the tokens marked `repeat`.
    pub repetition_penalty: f32,
    /// Top logprobs wanted (None: no logprobs at all).
    pub logprobs: Option<u8>,
    /// At most one entry per token.
    pub adjust: Vec<TokenAdjust>,
    /// Tokens an output constraint allows (bit `t % 32` of word `t / 32`); None: all.
    pub allowed: Option<Vec<u32>>,
}

/// What penalties and bias do to one token's logit: the repetition penalty (when `repeat`),
/// then `+ add`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenAdjust {
    /// The token.
    pub token: u32,
    /// Apply the repetition penalty.
    pub repeat: bool,
    /// Presence and frequency penalties (negative) plus the logit bias.
    pub add: f32,
}

/// The device sampler's answer for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSample {
    /// The token.
    pub id: u32,
    /// Its log-probability under the raw logits, when logprobs were asked for.
    pub logprob: Option<f32>,
    /// The top logprobs `(id, logprob)`, best first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::{Result, Tensor};

    use super::runs_kernels;
    use crate::compute::attention::{AttentionOpts, HeadDims, Projected};
    use crate::compute::batch::BatchInput;
    use crate::compute::cuda;
    use crate::compute::layers::RotaryAtPositions;
    use crate::compute::paged_kv::LayerKv;

    /// `(x + delta, rms_norm(x + delta) · weight)` (weight f32; `x` itself without a delta) in
    /// one kernel, or None.
    pub fn add_rms_norm(
        x: &Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !runs_kernels(x.device()) {
            return Ok(None);
        }
        cuda::add_rms_norm(x, delta, weight, eps).map(Some)
    }

    /// `act(gate) · up` (SiLU, or tanh GELU when `gelu`) in one kernel, or None.
    pub fn gated_act(gate: &Tensor, up: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
        if !runs_kernels(gate.device()) {
            return Ok(None);
        }
        cuda::gated_act(gate, up, gelu).map(Some)
    }

    /// Each row's next token chosen on the device (`logits` `[S, vocab]` f32, adjusted in
    /// place), or None.
    pub fn sample_rows(logits: &Tensor, rows: &[super::DeviceSampleRow]) -> Result<Option<Vec<super::DeviceSample>>> {
        if !runs_kernels(logits.device()) {
            return Ok(None);
        }
        cuda::sample_rows(logits, rows).map(Some)
    }

    /// One forward's attention through the kernels: K/V written and read in place.
    #[derive(Debug)]
    pub struct KernelAttention {
        plan: cuda::StepPlan,
        dims: HeadDims,
    }

    impl KernelAttention {
        /// The kernels' plan for `batch`, or None where they do not run (not CUDA, or heads
        /// wider than the kernels hold).
        pub fn plan(batch: &BatchInput, dims: HeadDims) -> Result<Option<Self>> {
            if !runs_kernels(batch.slot_mapping.device()) || dims.head_dim > cuda::MAX_HEAD_DIM {
                return Ok(None);
            }
            let plan = cuda::StepPlan::new(batch, dims.num_heads, dims.num_kv_heads)?;
            Ok(Some(Self { plan, dims }))
        }

        /// Bias, head norms and rope in one kernel that also writes K/V into their slots;
        /// returns rotated q `[T, heads, head_dim]`.
        pub fn store_kv(&self, p: &Projected, rope: &RotaryAtPositions, kv: &LayerKv) -> Result<Tensor> {
            let d = self.dims;
            let raw = cuda::RawQkv {
                q: &p.q,
                k: &p.k,
                v: &p.v,
                bias: p.bias.as_ref(),
                norms: p.norms.map(|n| (n.q.weight(), n.k.weight(), n.q.eps())),
                heads: (d.num_heads, d.num_kv_heads, d.head_dim),
            };
            let tables = cuda::RopeTables {
                cos: rope.cos_table(),
                sin: rope.sin_table(),
                positions: rope.positions(),
                rotary_dim: rope.rotary_dim(),
                interleaved: rope.interleaved(),
            };
            cuda::qkv_store(&raw, &tables, kv, &self.plan)
        }

        /// Attention over the cache in place: `[T, heads * head_dim]`.
        pub fn attend(&self, q: &Tensor, kv: &LayerKv, opts: AttentionOpts) -> Result<Tensor> {
            let layer = cuda::LayerAttention {
                num_kv_heads: self.dims.num_kv_heads,
                scale: opts.scale as f32,
                softcap: opts.softcap.map(|c| c as f32),
                window: opts.window,
            };
            cuda::paged_attention(q, kv, &self.plan, layer)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    use crate::compute::attention::{AttentionOpts, HeadDims, Projected};
    use crate::compute::batch::BatchInput;
    use crate::compute::layers::RotaryAtPositions;
    use crate::compute::paged_kv::LayerKv;

    /// No kernels in this build: always None.
    pub fn add_rms_norm(_: &Tensor, _: Option<&Tensor>, _: &Tensor, _: f32) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// No kernels in this build: always None.
    pub fn gated_act(_: &Tensor, _: &Tensor, _: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// No kernels in this build: always None.
    pub fn sample_rows(_: &Tensor, _: &[super::DeviceSampleRow]) -> Result<Option<Vec<super::DeviceSample>>> {
        Ok(None)
    }

    /// Cannot exist without the `cuda` feature.
    #[derive(Debug)]
    pub enum KernelAttention {}

    impl KernelAttention {
        /// No kernels in this build: always None.
        pub fn plan(_: &BatchInput, _: HeadDims) -> Result<Option<Self>> {
            Ok(None)
        }

        /// Unreachable: no value of this type exists.
        pub fn store_kv(&self, _: &Projected, _: &RotaryAtPositions, _: &LayerKv) -> Result<Tensor> {
            match *self {}
        }

        /// Unreachable: no value of this type exists.
        pub fn attend(&self, _: &Tensor, _: &LayerKv, _: AttentionOpts) -> Result<Tensor> {
            match *self {}
        }
    }
}
