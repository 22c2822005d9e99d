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
use super::mlx::MlxMatrix;
use super::mxfp4::Mxfp4Matrix;
use super::source::WeightSource;
use crate::compute::cpu::HostMatrix;
use crate::compute::layers::{Embed, Linear, RmsNorm};

/// Which projection of a mixture's experts (mlx-lm stacks each as `switch_mlp.<gate|up|down>_proj`
/// whatever the family calls it per expert).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertProjection {
    /// The gate.
    Gate,
    /// The up projection.
    Up,
    /// The down projection.
    Down,
}

/// The experts of one projection: how many, and each one's `[out_dim, in_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    /// Experts in the layer.
    pub experts: usize,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
}

impl WeightSource {
    /// The linear layer `<prefix>.weight` (`[out, in]`, MLX-packed with `scales`/`biases`, or
    /// GGUF blocks) and, if `bias`, `<prefix>.bias`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.get(out_dim, "bias")?) } else { None };
        if let Some(hf) = self.as_hf().filter(|hf| MlxMatrix::present(hf)) {
            return self.mlx_linear(MlxMatrix::load(hf, in_dim, out_dim)?, bias);
        }
        if let Some(m) = self.mxfp4("weight") {
            return self.mxfp4_linear(m?, in_dim, out_dim, bias);
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
        self.dense_linear(self.get((out_dim, in_dim), "weight")?, bias)
    }

    /// A layer over a dense `[out, in]` weight read (or derived) from this source, laid out for
    /// its device and numerics (`Linear::from_dense`).
    pub fn dense_linear(&self, weight: candle_core::Tensor, bias: Option<candle_core::Tensor>) -> Result<Linear> {
        Linear::from_dense(weight, bias, self.numerics())
    }

    /// The token embeddings `<prefix>.weight` of a `[vocab, hidden]` table (dense, MLX-packed
    /// or GGUF blocks).
    pub fn embed(&self, vocab: usize, hidden: usize) -> Result<Embed> {
        let dtype = self.dtype();
        if let Some(hf) = self.as_hf().filter(|hf| MlxMatrix::present(hf)) {
            let packed = MlxMatrix::load(hf, hidden, vocab)?;
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

    /// One projection of every expert of a mixture under this block: `experts.<e>.<name>`, one
    /// tensor per expert (Hugging Face folders; GGUF's 3-D tensors are read through the same
    /// names), or mlx-lm's stacked `switch_mlp.<gate|up|down>_proj` (Gemma 4:
    /// `switch_glu.<…>`; `[experts, out, in]`, quantized or dense), read once and split.
    pub fn expert_linears(&self, name: &str, projection: ExpertProjection, shape: ExpertShape) -> Result<Vec<Linear>> {
        let ExpertShape {
            experts,
            in_dim,
            out_dim,
        } = shape;
        let projection_name = match projection {
            ExpertProjection::Gate => "gate_proj",
            ExpertProjection::Up => "up_proj",
            ExpertProjection::Down => "down_proj",
        };
        let stacked_block = ["switch_mlp", "switch_glu"]
            .into_iter()
            .find(|block| self.contains_tensor(&format!("{block}.{projection_name}.weight")))
            .unwrap_or("switch_mlp");
        let stacked = self.pp(stacked_block).pp(projection_name);
        if stacked.as_hf().is_some_and(|hf| hf.contains_tensor("weight")) {
            return stacked.stacked_linears(shape, false);
        }
        (0..experts)
            .map(|e| self.pp(format!("experts.{e}")).pp(name).linear(in_dim, out_dim, false))
            .collect()
    }

    /// Every expert's layer of the stacked `<prefix>.weight` (`[experts, out, in]`, dense or
    /// MLX-packed) and, if `bias`, `<prefix>.bias` (`[experts, out]`): mlx-lm's `SwitchLinear`.
    pub fn stacked_linears(&self, shape: ExpertShape, bias: bool) -> Result<Vec<Linear>> {
        let ExpertShape {
            experts,
            in_dim,
            out_dim,
        } = shape;
        let biases = if bias {
            let all = self.get((experts, out_dim), "bias")?;
            (0..experts).map(|e| all.get(e).map(Some)).collect::<Result<Vec<_>>>()?
        } else {
            vec![None; experts]
        };
        if let Some(hf) = self.as_hf().filter(|hf| MlxMatrix::present(hf)) {
            return MlxMatrix::load_stacked(hf, experts, in_dim, out_dim)?
                .into_iter()
                .zip(biases)
                .map(|(w, b)| self.mlx_linear(w, b))
                .collect();
        }
        let all = self.get((experts, out_dim, in_dim), "weight")?;
        biases
            .into_iter()
            .enumerate()
            .map(|(e, b)| self.dense_linear(all.get(e)?, b))
            .collect()
    }

    /// Every expert's `[out_dim, in_dim]` slice of the stacked tensor `<prefix>.<name>`
    /// (`[experts, out_dim, in_dim]`, no `.weight`: transformers 5's fused experts, e.g. Gemma
    /// 4's `experts.gate_up_proj`), one dense layer each.
    pub fn stacked_expert_linears(&self, name: &str, shape: ExpertShape) -> Result<Vec<Linear>> {
        let all = self.get((shape.experts, shape.out_dim, shape.in_dim), name)?;
        (0..shape.experts)
            .map(|e| self.dense_linear(all.get(e)?, None))
            .collect()
    }

    /// Every expert's MXFP4 matrix `[rows, cols]` of Hugging Face's stacked `<name>_blocks`
    /// (`[experts, rows, cols/32, 16]` u8) and `<name>_scales` (`[experts, rows, cols/32]` u8),
    /// as openai/gpt-oss-* store their experts.
    pub fn mxfp4_stacked(&self, name: &str, experts: usize, rows: usize, cols: usize) -> Result<Vec<Mxfp4Matrix>> {
        let Some(hf) = self.as_hf() else {
            candle_core::bail!("`{name}_blocks`: MXFP4 pairs are read from safetensors");
        };
        let blocks = hf.get_unchecked_dtype(&format!("{name}_blocks"), candle_core::DType::U8)?;
        let scales = hf.get_unchecked_dtype(&format!("{name}_scales"), candle_core::DType::U8)?;
        let groups = cols / 32;
        if blocks.dims() != [experts, rows, groups, 16] || scales.dims() != [experts, rows, groups] {
            candle_core::bail!(
                "{}.{name}: MXFP4 blocks {:?} and scales {:?} do not fit {experts} [{rows}, {cols}] matrices",
                hf.prefix(),
                blocks.shape(),
                scales.shape()
            );
        }
        (0..experts)
            .map(|e| {
                let codes = blocks.get(e)?.flatten_all()?.to_vec1::<u8>()?;
                Mxfp4Matrix::from_pairs(codes, scales.get(e)?.flatten_all()?.to_vec1()?, rows, cols)
            })
            .collect()
    }

    /// An MXFP4 matrix as this source's device computes it: CPU panels with its codes kept, or
    /// dequantized once for a GPU.
    pub fn mxfp4_linear(
        &self,
        m: Mxfp4Matrix,
        in_dim: usize,
        out_dim: usize,
        bias: Option<candle_core::Tensor>,
    ) -> Result<Linear> {
        if (m.rows(), m.cols()) != (out_dim, in_dim) {
            candle_core::bail!(
                "MXFP4 weight is [{}, {}], expected [{out_dim}, {in_dim}]",
                m.rows(),
                m.cols()
            );
        }
        if !self.device().is_cpu() {
            return self.dense_linear(m.dequantized(self.device(), self.dtype())?, bias);
        }
        Ok(Linear::Packed(Arc::new(HostMatrix::Blocks(m.packed()?)), bias))
    }

    /// MLX-packed weights as this source's device computes them: CPU panels, or dequantized once
    /// for a GPU.
    fn mlx_linear(&self, packed: MlxMatrix, bias: Option<candle_core::Tensor>) -> Result<Linear> {
        if !self.device().is_cpu() {
            return self.dense_linear(packed.dequantized(self.device(), self.dtype())?, bias);
        }
        Ok(Linear::Packed(Arc::new(HostMatrix::Blocks(packed.packed()?)), bias))
    }

    /// The RMS norm `<prefix>.weight` of size `dim` (Gemma's `1 + w` with `unit_offset`).
    pub fn rms_norm(&self, dim: usize, eps: f64, unit_offset: bool) -> Result<RmsNorm> {
        RmsNorm::new(self.get(dim, "weight")?, eps, unit_offset)
    }
}
