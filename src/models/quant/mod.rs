//! Quantized weight formats kept packed in memory; matrix products dequantize on the fly.

pub mod mlx;
