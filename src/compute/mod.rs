//! How each device computes what model families describe.

pub mod attention;
pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod layers;
pub mod paged_kv;
pub mod sampling;
