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
