//! Attention through mlxd's CUDA kernels (`compute::cuda`): K/V written and read in place, one
//! plan per forward. A build without the `cuda` feature has the type with no values, so
//! `AttentionMeta` falls back to the host or gathered paths.

pub use imp::KernelAttention;

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::{Result, Tensor};

    use crate::compute::attention::{AttentionOpts, HeadDims, Projected};
    use crate::compute::batch::BatchInput;
    use crate::compute::cuda;
    use crate::compute::fused::runs_kernels;
    use crate::compute::layers::RotaryAtPositions;
    use crate::compute::paged_kv::LayerKv;
    use crate::compute::Numerics;

    /// One forward's attention through the kernels: K/V written and read in place.
    #[derive(Debug)]
    pub struct KernelAttention {
        plan: cuda::StepPlan,
        dims: HeadDims,
    }

    impl KernelAttention {
        /// The kernels' plan for `batch`, or None where they do not run (not CUDA, or heads
        /// wider than the kernels hold). `BatchInvariant` keeps every row on the one paged
        /// kernel, unsplit.
        pub fn plan(batch: &BatchInput, dims: HeadDims, numerics: Numerics) -> Result<Option<Self>> {
            // The kernels are causal: a step with image soft tokens (bidirectional within an
            // image) takes the gathered path.
            if !runs_kernels(batch.slot_mapping.device())
                || dims.head_dim > cuda::MAX_HEAD_DIM
                || batch.images.is_some()
            {
                return Ok(None);
            }
            let plan = cuda::StepPlan::new(batch, dims.num_heads, dims.num_kv_heads, numerics)?;
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
        pub fn attend(&self, q: &Tensor, kv: &LayerKv, opts: &AttentionOpts) -> Result<Tensor> {
            let layer = cuda::LayerAttention {
                num_kv_heads: self.dims.num_kv_heads,
                scale: opts.scale as f32,
                softcap: opts.softcap.map(|c| c as f32),
                window: opts.window,
                sinks: opts.sinks.as_ref(),
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
    use crate::compute::Numerics;

    /// Cannot exist without the `cuda` feature.
    #[derive(Debug)]
    pub enum KernelAttention {}

    impl KernelAttention {
        /// No kernels in this build: always None.
        pub fn plan(_: &BatchInput, _: HeadDims, _: Numerics) -> Result<Option<Self>> {
            Ok(None)
        }

        /// Unreachable: no value of this type exists.
        pub fn store_kv(&self, _: &Projected, _: &RotaryAtPositions, _: &LayerKv) -> Result<Tensor> {
            match *self {}
        }

        /// Unreachable: no value of this type exists.
        pub fn attend(&self, _: &Tensor, _: &LayerKv, _: &AttentionOpts) -> Result<Tensor> {
            match *self {}
        }
    }
}
