//! How each device computes what the model families describe: the layer types a family is
//! written in (`layers`: `Linear`, `Embed`, `RmsNorm`, `Rotary`, `GatedMlp`; `experts`: `SparseMoe`), the one paged
//! attention path (`attention`) over the KV memory (`paged_kv`), a step's packed input
//! (`batch`), and below them each device's own code: the CPU's weight layouts and kernels
//! (`cpu`), mlxd's CUDA kernels (`cuda`, behind the `fused` and `attention::kernel` facades
//! that answer None off CUDA) and the device sampler's rows (`sampling`).
//!
//! Owner: the engine thread. Nothing here knows a family, a file format or a request: families
//! call these types (`models`), loading builds them (`formats::layers`), and the engine drives
//! a step with a `BatchInput` and a `PagedKvCache`.

pub mod attention;
pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod experts;
pub mod fused;
pub mod layers;
pub mod paged_kv;
pub mod sampling;

/// How a model's products and attention reduce. The default picks the fastest kernels, whose
/// reduction order may depend on how many rows share a step (candle's gemm blocks by batch
/// size; the CPU attention tiles keys from each work item's first key); `BatchInvariant`
/// (`--deterministic`) fixes each output's reduction order per row, so a request's numbers do
/// not depend on what else the step holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// The fastest kernels; results may differ in the last bits with the batch.
    #[default]
    Fastest,
    /// Every row's reductions in an order fixed per row: bit for bit the same in any batch.
    BatchInvariant,
}
