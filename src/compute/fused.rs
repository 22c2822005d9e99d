//! Where layers (and the engine's sampler) meet mlxd's fused CUDA kernels (`compute::cuda`).
//! Each entry point runs its fused kernel when the tensors live on a CUDA device of a `cuda`
//! build, and otherwise answers None so the caller does the same work with candle ops or on
//! the host. Attention's kernels have their own facade, `attention::kernel`.

use candle_core::Device;

pub use imp::*;

/// True when tensors on `device` go through mlxd's own fused CUDA kernels (`compute::cuda`)
/// instead of chains of candle ops: a CUDA device in a `cuda` build.
pub fn runs_kernels(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::{Result, Tensor};

    use super::runs_kernels;
    use crate::compute::cuda;
    use crate::compute::sampling::{DeviceSample, DeviceSampleRow};

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
    pub fn sample_rows(logits: &Tensor, rows: &[DeviceSampleRow]) -> Result<Option<Vec<DeviceSample>>> {
        if !runs_kernels(logits.device()) {
            return Ok(None);
        }
        cuda::sample_rows(logits, rows).map(Some)
    }

    /// `x · Wᵀ` with each row's sums in an order that does not depend on the number of rows
    /// (`--deterministic`), or None.
    pub fn row_invariant_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        if !runs_kernels(x.device()) {
            return Ok(None);
        }
        cuda::row_invariant_matmul(x, w).map(Some)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    use crate::compute::sampling::{DeviceSample, DeviceSampleRow};

    /// No kernels in this build: always None.
    pub fn add_rms_norm(_: &Tensor, _: Option<&Tensor>, _: &Tensor, _: f32) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// No kernels in this build: always None.
    pub fn gated_act(_: &Tensor, _: &Tensor, _: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// No kernels in this build: always None.
    pub fn sample_rows(_: &Tensor, _: &[DeviceSampleRow]) -> Result<Option<Vec<DeviceSample>>> {
        Ok(None)
    }

    /// No kernels in this build: always None.
    pub fn row_invariant_matmul(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
