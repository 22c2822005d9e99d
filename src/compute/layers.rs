//! The layer types every model family is written in: linear layers, token embeddings,
//! RMSNorm, rotary embeddings, the gated MLP. Each holds its weights in the form its device
//! computes fastest (`formats::layers` decides that form at load) and runs on candle ops, the
//! CPU kernels (`cpu`) or the fused CUDA kernels (`fused`).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::cpu::host_ops;
use super::cpu::packed::PackedMatrix;
use super::cpu::HostMatrix;
use super::fused::{self, runs_kernels};
use super::Numerics;

/// A linear layer `y = x Wᵀ + b`. An enum so quantized weight formats slot in beside the dense
/// one without changing model code.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weights in the compute dtype.
    Dense(candle_nn::Linear),
    /// Weights on the CPU in the kernels' layouts (MLX affine, GGUF blocks or F16, bf16/f16 and
    /// f32 checkpoints); the layer's own bias (if any) is dense.
    Packed(Arc<HostMatrix>, Option<Tensor>),
    /// GGUF weights through candle's quantized matmul (a GPU, or a type the packed kernels do
    /// not take); dense bias.
    Gguf(Arc<QMatMul>, Option<Tensor>),
    /// Dense bf16/f16 weights on a GPU under `--deterministic`: multiplied by a kernel whose
    /// per-row sums do not depend on the batch's size (`fused::row_invariant_matmul`), where
    /// cuBLAS picks its algorithm by it.
    RowInvariant(candle_nn::Linear),
}

impl Linear {
    /// A dense layer from a `[out, in]` weight in the compute dtype; on the CPU a bf16/f16
    /// checkpoint's weight becomes f16 panels, which read half the bytes of f32 and run the f16
    /// kernel, and an f32 one f32 panels, instead of candle's f32 gemm (`HostMatrix::from_dense`).
    /// On a GPU in the batch-invariant mode it multiplies through the row-invariant kernel.
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>, numerics: Numerics) -> Result<Self> {
        if numerics == Numerics::BatchInvariant && runs_kernels(weight.device()) {
            return Ok(Self::RowInvariant(candle_nn::Linear::new(weight, bias)));
        }
        Ok(match HostMatrix::from_dense(&weight)? {
            Some(half) => Self::Packed(Arc::new(half), bias),
            None => Self::Dense(candle_nn::Linear::new(weight, bias)),
        })
    }

    /// A dense layer over an existing weight (tied embeddings), multiplied as `numerics` asks.
    pub fn from_weight(weight: Tensor, numerics: Numerics) -> Self {
        let layer = candle_nn::Linear::new(weight, None);
        match numerics == Numerics::BatchInvariant && runs_kernels(layer.weight().device()) {
            true => Self::RowInvariant(layer),
            false => Self::Dense(layer),
        }
    }

    /// The dense weights and bias of a dense layer (by default or row-invariant).
    pub fn dense(&self) -> Option<&candle_nn::Linear> {
        match self {
            Self::Dense(l) | Self::RowInvariant(l) => Some(l),
            _ => None,
        }
    }

    /// The CPU kernels' block-quantized matrix of a layer without bias, if it is one (the
    /// experts of a mixture are multiplied together through it).
    pub fn packed_blocks(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Packed(w, None) => w.as_blocks(),
            _ => None,
        }
    }

    /// The layer's own bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(l) | Self::RowInvariant(l) => l.bias(),
            Self::Packed(_, b) | Self::Gguf(_, b) => b.as_ref(),
        }
    }

    /// Splits a fused projection by output rows (`qkv_proj`, `gate_up_proj`) into one layer
    /// per part, in order.
    pub fn split_rows(&self, sizes: &[usize]) -> Result<Vec<Linear>> {
        let bias = self.bias();
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let b = bias.map(|b| b.narrow(0, start, n)?.contiguous()).transpose()?;
                let part = match self {
                    Self::Dense(l) => {
                        Self::Dense(candle_nn::Linear::new(l.weight().narrow(0, start, n)?.contiguous()?, b))
                    }
                    Self::RowInvariant(l) => {
                        Self::RowInvariant(candle_nn::Linear::new(l.weight().narrow(0, start, n)?.contiguous()?, b))
                    }
                    Self::Packed(w, _) => Self::Packed(Arc::new(w.rows(start, n)?), b),
                    // candle cannot slice a block-quantized tensor: fused GGUF projections
                    // (Phi-3) are split dense, in f32 (GGUF models compute in f32).
                    Self::Gguf(w, _) => Self::Dense(candle_nn::Linear::new(
                        w.dequantize_f16()?
                            .to_dtype(DType::F32)?
                            .narrow(0, start, n)?
                            .contiguous()?,
                        b,
                    )),
                };
                start += n;
                Ok(part)
            })
            .collect()
    }

    /// The fused projection of `parts` (they read the same input) where fusing pays: on CUDA
    /// any concatenation (one launch instead of several); on the CPU packed parts (one
    /// parallel product instead of several). None where the parts stay separate.
    pub fn fuse(parts: &[&Linear], device: &Device) -> Result<Option<Linear>> {
        let packed = parts.iter().all(|p| matches!(p, Self::Packed(..)));
        if runs_kernels(device) || packed {
            Self::concat(parts)
        } else {
            Ok(None)
        }
    }

    /// One layer whose output rows are those of `parts` in order, or None unless the parts
    /// are all dense, all packed alike or all GGUF blocks of one type. Biases are concatenated
    /// when every part has one.
    fn concat(parts: &[&Linear]) -> Result<Option<Linear>> {
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        for invariant in [false, true] {
            let dense: Option<Vec<&Tensor>> = parts
                .iter()
                .map(|p| match p {
                    Self::Dense(l) if !invariant => Some(l.weight()),
                    Self::RowInvariant(l) if invariant => Some(l.weight()),
                    _ => None,
                })
                .collect();
            if let Some(weights) = dense {
                let layer = candle_nn::Linear::new(Tensor::cat(&weights, 0)?, bias);
                return Ok(Some(match invariant {
                    true => Self::RowInvariant(layer),
                    false => Self::Dense(layer),
                }));
            }
        }
        let packed: Option<Vec<&HostMatrix>> = parts
            .iter()
            .map(|p| match p {
                Self::Packed(m, _) => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        if let Some(packed) = packed {
            return Ok(HostMatrix::stack(&packed)?.map(|m| Self::Packed(Arc::new(m), bias)));
        }
        let blocks: Option<Vec<&QTensor>> = parts
            .iter()
            .map(|p| match p {
                Self::Gguf(q, _) => match q.as_ref() {
                    QMatMul::QTensor(t) => Some(t.as_ref()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let Some(blocks) = blocks else {
            return Ok(None);
        };
        // Rows of a block-quantized matrix are independent runs of blocks: the fused matrix
        // is the parts' bytes one after the other.
        let dtype = blocks[0].dtype();
        let cols = blocks[0].shape().dims()[1];
        if blocks.iter().any(|b| b.dtype() != dtype || b.shape().dims()[1] != cols) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        for b in &blocks {
            bytes.extend_from_slice(&b.data()?);
        }
        let rows: usize = blocks.iter().map(|b| b.shape().dims()[0]).sum();
        let device = blocks[0].device();
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
        let fused = QMatMul::from_qtensor(QTensor::new(storage, (rows, cols))?)?;
        Ok(Some(Self::Gguf(Arc::new(fused), bias)))
    }

    /// `x Wᵀ` and, for a dense layer, its bias still to add (a fused kernel that follows adds
    /// it without a launch of its own); other layers add their bias themselves.
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Dense(l) => Ok((x.matmul(&l.weight().t()?)?, l.bias().cloned())),
            Self::RowInvariant(l) => Ok((row_invariant_product(x, l.weight())?, l.bias().cloned())),
            _ => Ok((self.forward(x)?, None)),
        }
    }

    /// Applies the layer to `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::RowInvariant(l) => with_bias(row_invariant_product(x, l.weight())?, l.bias()),
            Self::Packed(w, bias) => with_bias(w.matmul(x)?, bias.as_ref()),
            Self::Gguf(w, bias) => {
                let dtype = x.dtype();
                with_bias(w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?, bias.as_ref())
            }
        }
    }
}

/// `x · Wᵀ` through the row-invariant kernel, which only a `cuda` build on a CUDA device has
/// (the only place `Linear::RowInvariant` is built).
fn row_invariant_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    match fused::row_invariant_matmul(x, w)? {
        Some(y) => Ok(y),
        None => candle_core::bail!("a row-invariant layer runs only on a CUDA device"),
    }
}

fn with_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Token embeddings: a dense matrix, or MLX-quantized rows dequantized on lookup.
#[derive(Debug, Clone)]
pub enum Embed {
    /// Dense `[vocab, hidden]`.
    Dense(candle_nn::Embedding),
    /// `[vocab, hidden]` on the CPU in the kernels' layouts (MLX, GGUF, dense), held once as
    /// the matrix of the tied output projection; lookups dequantize only the requested rows.
    /// And the dtype rows are produced in.
    Packed(Arc<HostMatrix>, DType),
    /// A GGUF table of a type the packed kernels do not take, held once the same way through
    /// candle's quantized embedding; and the compute dtype.
    Gguf(Arc<QMatMul>, DType),
    /// GGUF on a GPU: the table dequantized once into device memory (f32, 4 bytes per value:
    /// 0.5 GB for a 150k × 896 table) so lookups never leave the device, which CUDA graphs
    /// need; the quantized matrix stays for the tied output projection.
    GgufOnDevice(candle_nn::Embedding, Arc<QMatMul>),
}

impl Embed {
    /// A dense `[vocab, hidden]` table in the compute dtype; on the CPU it is held once in the
    /// kernels' panels (f16 for a bf16/f16 checkpoint, else f32), also as the tied head.
    pub fn from_dense(table: Tensor, dtype: DType) -> Result<Self> {
        let hidden = table.dim(1)?;
        Ok(match HostMatrix::from_dense(&table)? {
            Some(half) => Self::Packed(Arc::new(half), dtype),
            None => Self::Dense(candle_nn::Embedding::new(table, hidden)),
        })
    }

    /// Rows for `ids` (`[T]` u32) → `[T, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Packed(w, dtype) => {
                let ids_host: Vec<u32> = ids.to_vec1()?;
                let rows = w.dequantize_rows(&ids_host)?;
                Tensor::from_vec(rows, (ids_host.len(), w.in_dim()), ids.device())?.to_dtype(*dtype)
            }
            Self::Gguf(matrix, dtype) => matrix.embedding(ids)?.to_dtype(*dtype),
            Self::GgufOnDevice(e, _) => e.forward(ids),
        }
    }

    /// The same matrix as an output projection (tied embeddings), multiplied as `numerics`
    /// asks.
    pub fn as_linear(&self, numerics: Numerics) -> Linear {
        match self {
            Self::Dense(e) => Linear::from_weight(e.embeddings().clone(), numerics),
            Self::Packed(w, _) => Linear::Packed(w.clone(), None),
            Self::Gguf(q, _) | Self::GgufOnDevice(_, q) => Linear::Gguf(q.clone(), None),
        }
    }
}

/// Root-mean-square layer norm; Gemma stores `w` and scales by `1 + w` (`unit_offset`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// A norm scaling by `weight` (or by `1 + weight` with `unit_offset`).
    pub fn new(mut weight: Tensor, eps: f64, unit_offset: bool) -> Result<Self> {
        if unit_offset {
            // Gemma's `1 + w` rounded to bf16 loses the small `w` (up to 0.1 in logits):
            // keep it in f32 and normalize in f32, as transformers does.
            weight = (weight.to_dtype(DType::F32)? + 1.0)?;
        } else if runs_kernels(weight.device()) {
            // The fused kernels take f32 weights for every compute dtype.
            weight = weight.to_dtype(DType::F32)?;
        }
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    /// The scale vector (f32 on CUDA and for Gemma, else the compute dtype).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Epsilon inside the root mean square.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Normalizes over the last dimension (candle's kernels accumulate in f32), returning the
    /// input's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cols = x.dim(D::Minus1)?;
        let rows = x.elem_count() / cols.max(1);
        if let Some((_, normed)) = fused::add_rms_norm(&x.reshape((rows, cols))?, None, &self.weight, self.eps)? {
            return normed.reshape(x.shape());
        }
        let dtype = x.dtype();
        if self.weight.dtype() == dtype {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps);
        }
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(self.weight.dtype())?.contiguous()?, &self.weight, self.eps)?;
        normed.to_dtype(dtype)
    }

    /// The residual stream's next value `x + delta` (just `x` without a delta) and its norm,
    /// `[T, dim]` each; one kernel on CUDA.
    pub fn add_forward(&self, x: &Tensor, delta: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        if let Some(fused) = fused::add_rms_norm(x, delta, &self.weight, self.eps)? {
            return Ok(fused);
        }
        let sum = match delta {
            Some(d) => (x + d)?,
            None => x.clone(),
        };
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

/// Cos/sin tables `[max_positions, rotary_dim / 2]`, row-major: what a model's rope
/// configuration computes and a `Rotary` holds.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// cos(position · inv_freq) per row.
    pub cos: Vec<f32>,
    /// sin(position · inv_freq) per row.
    pub sin: Vec<f32>,
    /// Columns per row (`rotary_dim / 2`).
    pub half_dim: usize,
}

/// Precomputed rotary cos/sin tables for every position up to the model's context.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
    interleaved: bool,
}

/// The rotation of one batch's positions, applied to q and k of every layer: cos/sin rows
/// gathered once per forward, or (CUDA) the tables and positions the fused kernel indexes.
#[derive(Debug, Clone)]
pub struct RotaryAtPositions {
    rotary: Rotary,
    positions: Tensor,
    /// `[T, rotary_dim / 2]` cos and sin rows; None where a kernel reads the tables.
    rows: Option<(Tensor, Tensor)>,
}

impl Rotary {
    /// The rotation by `tables` (one row per position), held on `device` in `dtype`.
    pub fn new(tables: RopeTables, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (tables.cos.len() / tables.half_dim.max(1), tables.half_dim);
        Ok(Self {
            cos: Tensor::from_vec(tables.cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(tables.sin, shape, device)?.to_dtype(dtype)?,
            rotary_dim: 2 * tables.half_dim,
            interleaved: false,
        })
    }

    /// Rotates interleaved pairs `(2i, 2i+1)` instead of halves (llama.cpp's `llama` layout).
    pub fn interleaved(mut self, interleaved: bool) -> Self {
        self.interleaved = interleaved;
        self
    }

    /// The rotation at `positions` (`[T]` u32).
    pub fn at(&self, positions: &Tensor) -> Result<RotaryAtPositions> {
        let rows = (!runs_kernels(positions.device()))
            .then(|| self.rows_at(positions))
            .transpose()?;
        Ok(RotaryAtPositions {
            rotary: self.clone(),
            positions: positions.clone(),
            rows,
        })
    }

    fn rows_at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

impl RotaryAtPositions {
    /// Rotates the first `rotary_dim` dims of `[T, heads, head_dim]` (half-split "neox"
    /// layout, as transformers); the remaining dims pass through.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let (cos, sin) = match &self.rows {
            Some(rows) => rows.clone(),
            None => self.rotary.rows_at(&self.positions)?,
        };
        let rotary_dim = self.rotary.rotary_dim;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            if self.rotary.interleaved {
                // rope_i wants [b, heads, T, d].
                let bhtd = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
                candle_nn::rotary_emb::rope_i(&bhtd, &cos, &sin)?
                    .squeeze(0)?
                    .transpose(0, 1)
            } else {
                candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &cos, &sin)?.squeeze(0)
            }
        };
        if rotary_dim == head_dim {
            return rotate(x);
        }
        let rotated = rotate(&x.narrow(D::Minus1, 0, rotary_dim)?)?;
        let pass = x.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
        Tensor::cat(&[rotated, pass], D::Minus1)
    }

    /// The positions rotated (`[T]` u32).
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// The whole cosine table `[max_positions, rotary_dim / 2]`, as a fused kernel indexes it.
    pub fn cos_table(&self) -> &Tensor {
        &self.rotary.cos
    }

    /// The whole sine table.
    pub fn sin_table(&self) -> &Tensor {
        &self.rotary.sin
    }

    /// Leading dims of each head that rotate.
    pub fn rotary_dim(&self) -> usize {
        self.rotary.rotary_dim
    }

    /// Pairs `(2i, 2i+1)` rotate instead of `(i, i + rotary_dim / 2)`.
    pub fn interleaved(&self) -> bool {
        self.rotary.interleaved
    }
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// x · sigmoid(x).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// gpt-oss's experts: `(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)` with
    /// `g = min(gate, limit)`.
    ClampedSwiglu {
        /// Sigmoid gain.
        alpha: f32,
        /// Clamp of the gate (above) and the up projection (both sides).
        limit: f32,
    },
}

impl Activation {
    /// From a config.json activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// `act(gate) * up`; one kernel on CUDA, one pass on the CPU for SiLU.
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if let Self::ClampedSwiglu { alpha, limit } = self {
            let limit = f64::from(limit);
            let gate = gate.minimum(limit)?;
            let glu = (&gate * candle_nn::ops::sigmoid(&(&gate * f64::from(alpha))?)?)?;
            return (up.clamp(-limit, limit)? + 1.0)? * glu;
        }
        if let Some(fused) = fused::gated_act(gate, up, self == Self::GeluTanh)? {
            return Ok(fused);
        }
        if self == Self::Silu {
            if let Some(host) = host_ops::silu_mul(gate, up)? {
                return Ok(host);
            }
        }
        let activated = match self {
            Self::GeluTanh => gate.gelu()?,
            _ => candle_nn::ops::silu(gate)?,
        };
        activated * up
    }
}

/// Gated MLP `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_up: GateUp,
    down: Linear,
    activation: Activation,
}

/// The gate and up projections: two layers, or (on CUDA; quantized weights on the CPU) one
/// layer whose output is `[gate | up]`, one product instead of two.
#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused { gate_up: Linear, intermediate: usize },
}

impl GatedMlp {
    /// An MLP over separate gate and up projections.
    pub fn separate(gate: Linear, up: Linear, down: Linear, activation: Activation) -> Self {
        Self {
            gate_up: GateUp::Separate { gate, up },
            down,
            activation,
        }
    }

    /// An MLP over one projection whose output is `[gate | up]`, `intermediate` wide each.
    pub fn fused(gate_up: Linear, intermediate: usize, down: Linear, activation: Activation) -> Self {
        Self {
            gate_up: GateUp::Fused { gate_up, intermediate },
            down,
            activation,
        }
    }

    /// The layers whose output rows are `[gate | up]`: the fused one, or gate and up.
    pub fn gate_up_parts(&self) -> Vec<&Linear> {
        match &self.gate_up {
            GateUp::Separate { gate, up } => vec![gate, up],
            GateUp::Fused { gate_up, .. } => vec![gate_up],
        }
    }

    /// The down projection.
    pub fn down(&self) -> &Linear {
        &self.down
    }

    /// The gate's activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Applies the MLP to `[T, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused { gate_up, intermediate } => {
                let both = gate_up.forward(x)?;
                (
                    both.narrow(1, 0, *intermediate)?,
                    both.narrow(1, *intermediate, *intermediate)?,
                )
            }
        };
        self.down.forward(&self.activation.gated(&gate, &up)?)
    }
}
