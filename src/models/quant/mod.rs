//! Quantized weight formats kept packed in memory. On the CPU every format is repacked into one
//! layout (`packed`) multiplied by one kernel family (`kernels`); `mlx` and `ggml` decode the
//! file formats into it.

pub mod ggml;
pub mod kernels;
pub mod mlx;
pub mod packed;
