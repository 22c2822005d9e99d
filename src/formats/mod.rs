//! Weight files and how they load.

pub mod ggml;
pub mod gguf;
pub mod mlx;
pub mod pooling;
pub mod source;
pub mod weights;
