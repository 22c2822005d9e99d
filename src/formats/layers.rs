//! Compute's layer types built from a `WeightSource`: which in-memory form each format's
//! tensors take on each device. MLX-packed weights are repacked into the CPU kernels' layout,
//! or dequantized once for a GPU (memory for speed: a 0.5B model is ~1 GB in bf16 instead of
//! ~0.3 GB in 4 bits, multiplied by cuBLAS); GGUF blocks are repacked on the CPU where the
//! kernels take their type and stay candle's `QMatMul` otherwise; dense tensors go to
//! `Linear::from_dense`, which decides their CPU layout.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::Result;

use super::ggml;
use super::mlx::MlxWeights;
use super::source::WeightSource;
use crate::compute::cpu::HostMatrix;
use crate::compute::layers::{Embed, Linear, RmsNorm};

impl WeightSource {
    /// The linear layer `<prefix>.weight` (`[out, in]`, MLX-packed with `scales`/`biases`, or
    /// GGUF blocks) and, if `bias`, `<prefix>.bias`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.get(out_dim, "bias")?) } else { None };
        if let Some(hf) = self.as_hf().filter(|hf| MlxWeights::present(hf)) {
            let packed = MlxWeights::load(hf, in_dim, out_dim)?;
            if !self.device().is_cpu() {
                return Linear::from_dense(packed.dequantized(self.device(), self.dtype())?, bias);
            }
            return Ok(Linear::Packed(Arc::new(HostMatrix::Blocks(packed.packed()?)), bias));
        }
        if let Some(q) = self.quantized("weight") {
            let q = q?;
            if q.shape().dims() != [out_dim, in_dim] {
                candle_core::bail!(
                    "quantized weight has shape {:?}, expected [{out_dim}, {in_dim}]",
                    q.shape()
                );
            }
            if q.device().is_cpu() {
                if let Some(packed) = ggml::host_matrix(&q)? {
                    return Ok(Linear::Packed(Arc::new(packed), bias));
                }
            }
            return Ok(Linear::Gguf(Arc::new(QMatMul::from_qtensor(q)?), bias));
        }
        Linear::from_dense(self.get((out_dim, in_dim), "weight")?, bias)
    }

    /// The token embeddings `<prefix>.weight` of a `[vocab, hidden]` table (dense, MLX-packed
    /// or GGUF blocks).
    pub fn embed(&self, vocab: usize, hidden: usize) -> Result<Embed> {
        let dtype = self.dtype();
        if let Some(hf) = self.as_hf().filter(|hf| MlxWeights::present(hf)) {
            let packed = MlxWeights::load(hf, hidden, vocab)?;
            if !self.device().is_cpu() {
                return Embed::from_dense(packed.dequantized(self.device(), dtype)?, dtype);
            }
            return Ok(Embed::Packed(Arc::new(HostMatrix::Blocks(packed.packed()?)), dtype));
        }
        if let Some(qtensor) = self.quantized("weight") {
            let qtensor = qtensor?;
            if !self.device().is_cpu() {
                let table = qtensor.dequantize(self.device())?.to_dtype(dtype)?;
                let matrix = QMatMul::from_qtensor(qtensor)?;
                return Ok(Embed::GgufOnDevice(
                    candle_nn::Embedding::new(table, hidden),
                    Arc::new(matrix),
                ));
            }
            return Ok(match ggml::host_matrix(&qtensor)? {
                Some(packed) => Embed::Packed(Arc::new(packed), dtype),
                None => Embed::Gguf(Arc::new(QMatMul::from_qtensor(qtensor)?), dtype),
            });
        }
        Embed::from_dense(self.get((vocab, hidden), "weight")?, dtype)
    }

    /// The RMS norm `<prefix>.weight` of size `dim` (Gemma's `1 + w` with `unit_offset`).
    pub fn rms_norm(&self, dim: usize, eps: f64, unit_offset: bool) -> Result<RmsNorm> {
        RmsNorm::new(self.get(dim, "weight")?, eps, unit_offset)
    }
}
