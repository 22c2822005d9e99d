//! A layer's experts on the GPU, stacked, and the launches of `moe.cuh`: the router's choice,
//! the grouping of rows by expert, one grouped product per projection on the tensor cores and
//! the weighted sum, all on the device. No routing reaches the host, so a decode step with
//! experts is captured as a CUDA graph like any other, and every expert's weights are read once
//! per step for all the rows routed to it (a batch of 64 streams reads each active expert once,
//! not once per row). Q8_0 experts stay in their blocks.

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{bail, DType, Device, Result, Tensor};

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

use super::{address, address_or_null, cuda_device, grid, launch, launch_untyped, output, row_stride, Arg};
use crate::compute::experts::Routing;
use crate::compute::layers::{Activation, GatedMlp, Linear};

/// Most experts a layer may have (`MOE_MAX_EXPERTS` in moe.cuh: the router keeps 8 per lane).
const MAX_EXPERTS: usize = 256;
/// Most experts per token (`MOE_MAX_TOP_K`).
const MAX_TOP_K: usize = 16;
/// Output columns per block of `moe_gemm` (`MOE_BN`).
const TILE_COLS: usize = 64;
/// Threads of a `moe_gemm` block (4 warps).
const GEMM_THREADS: u32 = 128;

/// Whether experts run grouped on the device: opt-in (`MLXD_CUDA_GROUPED_EXPERTS=1`) until
/// `scripts/test-gpu.sh check` has held them to the fixtures' references on a GPU (their speed
/// was measured on an H100 in session 15; no device time was left to run the checks, which a
/// missing fixture folder had stopped). Otherwise the per-expert products with host routing.
pub fn grouped_experts() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MLXD_CUDA_GROUPED_EXPERTS").is_some_and(|v| v == "1"))
}

/// Whether candle's quantized matmuls run exactly (`MLXD_CUDA_FORCE_DMMV=1`, the mode in which
/// GGUF runs are checked against llama.cpp's dequantized-f32 run): Q8_0 experts then keep the
/// per-expert products too, since the grouped kernel rounds activations to bf16.
fn exact_quantized() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MLXD_CUDA_FORCE_DMMV").is_some_and(|v| v != "0"))
}

/// How one projection of every expert is held.
#[derive(Debug)]
enum ExpertWeights {
    /// `[experts, rows, cols]` in the compute dtype (bf16 or f16).
    Dense(Tensor),
    /// Every expert's rows of Q8_0 blocks one after the other, as GGUF stores them (u8).
    Q8_0(Tensor),
}

/// One projection of every expert, each `[rows, cols]`.
#[derive(Debug)]
struct ExpertMatrix {
    weights: ExpertWeights,
    rows: usize,
    cols: usize,
}

impl ExpertMatrix {
    /// The experts' `parts` (each expert's layers, stacked by rows: `[gate, up]` or one) as
    /// one matrix, or None unless every layer is dense bf16/f16 or Q8_0 blocks alike, with
    /// rows whose width the kernel takes.
    fn stack(parts: &[Vec<&Linear>], cols: usize, device: &Device) -> Result<Option<Self>> {
        let dense_weight = |l: &&Linear| match l {
            Linear::Dense(d) if matches!(d.weight().dtype(), DType::BF16 | DType::F16) => Some(d.weight().clone()),
            _ => None,
        };
        let dense: Option<Vec<Vec<Tensor>>> = parts.iter().map(|p| p.iter().map(dense_weight).collect()).collect();
        if let Some(dense) = dense {
            if !cols.is_multiple_of(8) || dense.iter().flatten().any(|w| w.dim(1).ok() != Some(cols)) {
                return Ok(None);
            }
            let per_expert = dense.iter().map(|w| Tensor::cat(w, 0)).collect::<Result<Vec<_>>>()?;
            let stacked = Tensor::stack(&per_expert, 0)?.contiguous()?;
            let rows = stacked.dim(1)?;
            return Ok(Some(Self {
                weights: ExpertWeights::Dense(stacked),
                rows,
                cols,
            }));
        }
        let q8_0 = |l: &&Linear| match l {
            Linear::Gguf(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) if t.dtype() == GgmlDType::Q8_0 => Some(t.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(blocks) = parts.iter().flatten().map(q8_0).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        if exact_quantized() {
            return Ok(None);
        }
        if !cols.is_multiple_of(32) || blocks.iter().any(|b| b.shape().dims()[1] != cols) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        let mut rows = 0;
        for b in &blocks {
            bytes.extend_from_slice(&b.data()?);
            rows += b.shape().dims()[0];
        }
        let n = bytes.len();
        Ok(Some(Self {
            weights: ExpertWeights::Q8_0(Tensor::from_vec(bytes, n, device)?),
            rows: rows / parts.len(),
            cols,
        }))
    }

    /// The kernel for activations of `dtype` in tiles of `bm` rows.
    fn kernel(&self, dtype: DType, bm: usize) -> Result<&'static str> {
        Ok(match (&self.weights, dtype, bm) {
            (ExpertWeights::Dense(_), DType::BF16, 16) => "moe_gemm_dense_m16_bf16",
            (ExpertWeights::Dense(_), DType::BF16, 64) => "moe_gemm_dense_m64_bf16",
            (ExpertWeights::Dense(_), DType::F16, 16) => "moe_gemm_dense_m16_f16",
            (ExpertWeights::Dense(_), DType::F16, 64) => "moe_gemm_dense_m64_f16",
            (ExpertWeights::Q8_0(_), DType::F32, 16) => "moe_gemm_q8_0_m16_f32",
            (ExpertWeights::Q8_0(_), DType::F32, 64) => "moe_gemm_q8_0_m64_f32",
            (ExpertWeights::Q8_0(_), DType::BF16, 16) => "moe_gemm_q8_0_m16_bf16",
            (ExpertWeights::Q8_0(_), DType::BF16, 64) => "moe_gemm_q8_0_m64_bf16",
            (w, dtype, bm) => bail!("no grouped expert kernel for {w:?} weights, {dtype:?} rows, tiles of {bm}"),
        })
    }

    fn data(&self) -> &Tensor {
        match &self.weights {
            ExpertWeights::Dense(t) | ExpertWeights::Q8_0(t) => t,
        }
    }
}

/// A layer's experts stacked on the GPU: gate and up rows (`[experts, 2 · inter, hidden]`), down
/// (`[experts, hidden, inter]`), their biases (f32) and the router's per-expert scales.
#[derive(Debug)]
pub struct DeviceExperts {
    gate_up: ExpertMatrix,
    down: ExpertMatrix,
    gate_up_bias: Option<Tensor>,
    down_bias: Option<Tensor>,
    scales: Option<Tensor>,
    activation: Activation,
    experts: usize,
}

impl DeviceExperts {
    /// `mlps` (one gated MLP per expert) stacked on their GPU, or None where the kernels do not
    /// take them: not on a GPU, f32 or other quantized weights, biases on some layers only,
    /// more than 256 experts or 16 per token. Those keep running one expert at a time.
    pub fn stack(mlps: &[GatedMlp], routing: Routing) -> Result<Option<Self>> {
        if mlps.is_empty() || mlps.len() > MAX_EXPERTS || routing.top_k > MAX_TOP_K {
            return Ok(None);
        }
        let Some(device) = device_of(mlps[0].down()).filter(Device::is_cuda) else {
            return Ok(None);
        };
        let activation = mlps[0].activation();
        if mlps.iter().any(|m| m.activation() != activation) {
            return Ok(None);
        }
        let gate_up_parts: Vec<Vec<&Linear>> = mlps.iter().map(GatedMlp::gate_up_parts).collect();
        let down_parts: Vec<Vec<&Linear>> = mlps.iter().map(|m| vec![m.down()]).collect();
        let (Some(gate_up_bias), Some(down_bias)) = (stacked_bias(&gate_up_parts)?, stacked_bias(&down_parts)?) else {
            return Ok(None);
        };
        let Some((hidden, inter)) = dims_of(mlps[0].down()) else {
            return Ok(None);
        };
        let Some(down) = ExpertMatrix::stack(&down_parts, inter, &device)? else {
            return Ok(None);
        };
        let Some(gate_up) = ExpertMatrix::stack(&gate_up_parts, hidden, &device)? else {
            return Ok(None);
        };
        if gate_up.rows != 2 * down.cols || down.rows != hidden {
            return Ok(None);
        }
        let same_kind = matches!(
            (&gate_up.weights, &down.weights),
            (ExpertWeights::Dense(_), ExpertWeights::Dense(_)) | (ExpertWeights::Q8_0(_), ExpertWeights::Q8_0(_))
        );
        if !same_kind {
            return Ok(None);
        }
        Ok(Some(Self {
            gate_up,
            down,
            gate_up_bias,
            down_bias,
            scales: None,
            activation,
            experts: mlps.len(),
        }))
    }

    /// Each kept expert's weight is multiplied by its scale (Gemma 4's `per_expert_scale`).
    pub fn set_scales(&mut self, scales: &[f32]) -> Result<()> {
        let device = Device::Cuda(cuda_device(self.down.data())?);
        self.scales = Some(Tensor::from_slice(scales, scales.len(), &device)?);
        Ok(())
    }

    /// The block's output `[T, hidden]` for `x` (`[T, hidden]`) routed by the router's
    /// `scores` (`[T, experts]`).
    pub fn forward(&self, scores: &Tensor, x: &Tensor, routing: Routing) -> Result<Tensor> {
        let device = cuda_device(x)?;
        let dtype = x.dtype();
        let x = x.contiguous()?;
        let (tokens, hidden) = x.dims2()?;
        let k = routing.top_k;
        let pairs = tokens * k;
        let scores = scores.to_dtype(DType::F32)?.contiguous()?;
        let ids = output(&device, pairs, DType::U32)?;
        let weights = output(&device, pairs, DType::F32)?;
        let route = [
            Arg::Ptr(address(&scores)?),
            Arg::U32(tokens as u32),
            Arg::U32(self.experts as u32),
            Arg::U32(k as u32),
            Arg::U32(routing.normalize as u32),
            Arg::Ptr(address_or_null(self.scales.as_ref())?),
            Arg::Ptr(address(&ids)?),
            Arg::Ptr(address(&weights)?),
        ];
        launch_untyped(&device, "moe_route", grid(tokens.div_ceil(4), 128, 0), &route)?;

        // Tiles of 64 rows once experts average 32 rows or more (prefill), of 16 otherwise.
        let bm = if pairs >= 32 * self.experts { 64 } else { 16 };
        let max_tiles = pairs.div_ceil(bm) + self.experts.min(pairs);
        let groups = Groups {
            sorted: output(&device, max_tiles * bm, DType::U32)?,
            tile_expert: output(&device, max_tiles, DType::U32)?,
            bm,
            max_tiles,
            pairs,
        };
        let align = [
            Arg::Ptr(address(&ids)?),
            Arg::U32(pairs as u32),
            Arg::U32(self.experts as u32),
            Arg::U32(bm as u32),
            Arg::U32(max_tiles as u32),
            Arg::Ptr(address(&groups.sorted)?),
            Arg::Ptr(address(&groups.tile_expert)?),
        ];
        launch_untyped(&device, "moe_align", grid(1, 1024, 0), &align)?;

        let gate_up = groups.product(&self.gate_up, &x, k)?;
        let inter = self.down.cols;
        let activated = output(&device, (pairs, inter), dtype)?;
        let (act, alpha, limit) = match self.activation {
            Activation::Silu => (0, 0.0, 0.0),
            Activation::GeluTanh => (1, 0.0, 0.0),
            Activation::ClampedSwiglu { alpha, limit } => (2, alpha, limit),
        };
        let act_args = [
            Arg::Ptr(address(&gate_up)?),
            Arg::Ptr(address_or_null(self.gate_up_bias.as_ref())?),
            Arg::Ptr(address(&ids)?),
            Arg::Ptr(address(&activated)?),
            Arg::U32(pairs as u32),
            Arg::U32(inter as u32),
            Arg::U32(act),
            Arg::F32(alpha),
            Arg::F32(limit),
        ];
        launch(&device, "moe_act", dtype, elementwise(pairs * inter), &act_args)?;

        let down = groups.product(&self.down, &activated, 1)?;
        let out = output(&device, (tokens, hidden), dtype)?;
        let combine = [
            Arg::Ptr(address(&down)?),
            Arg::Ptr(address_or_null(self.down_bias.as_ref())?),
            Arg::Ptr(address(&ids)?),
            Arg::Ptr(address(&weights)?),
            Arg::Ptr(address(&out)?),
            Arg::U32(tokens as u32),
            Arg::U32(k as u32),
            Arg::U32(hidden as u32),
        ];
        launch(&device, "moe_combine", dtype, elementwise(tokens * hidden), &combine)?;
        Ok(out)
    }
}

/// A step's (token, expert) pairs grouped by expert into tiles (`moe_align`'s output).
struct Groups {
    /// The pair of each tile row (`u32::MAX` pads).
    sorted: Tensor,
    /// Each tile's expert (`u32::MAX` past the used tiles).
    tile_expert: Tensor,
    bm: usize,
    max_tiles: usize,
    pairs: usize,
}

impl Groups {
    /// `[pairs, matrix.rows]`: every pair's row of `a` (row `pair / a_row_div`) times its
    /// expert's matrix.
    fn product(&self, matrix: &ExpertMatrix, a: &Tensor, a_row_div: usize) -> Result<Tensor> {
        let device = cuda_device(a)?;
        let dtype = a.dtype();
        let c = output(&device, (self.pairs, matrix.rows), dtype)?;
        let args = [
            Arg::Ptr(address(a)?),
            Arg::U32(row_stride(a)?),
            Arg::U32(a_row_div as u32),
            Arg::Ptr(address(matrix.data())?),
            Arg::Ptr(address(&self.sorted)?),
            Arg::Ptr(address(&self.tile_expert)?),
            Arg::Ptr(address(&c)?),
            Arg::U32(matrix.rows as u32),
            Arg::U32(matrix.cols as u32),
        ];
        let cfg = LaunchConfig {
            grid_dim: (matrix.rows.div_ceil(TILE_COLS) as u32, self.max_tiles as u32, 1),
            block_dim: (GEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch_untyped(&device, matrix.kernel(dtype, self.bm)?, cfg, &args)?;
        Ok(c)
    }
}

/// A grid of 256-thread blocks over `n` elements (the kernels stride past 65,535 blocks).
fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).clamp(1, 65_535), 256, 0)
}

/// The device a layer's weights live on (dense or GGUF blocks).
fn device_of(layer: &Linear) -> Option<Device> {
    match layer {
        Linear::Dense(l) => Some(l.weight().device().clone()),
        Linear::Gguf(q, _) => match q.as_ref() {
            QMatMul::QTensor(t) => Some(t.device()),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Some(t.device().clone()),
        },
        Linear::Packed(..) => None,
    }
}

/// `[out, in]` of a dense or GGUF layer.
fn dims_of(layer: &Linear) -> Option<(usize, usize)> {
    match layer {
        Linear::Dense(l) => l.weight().dims2().ok(),
        Linear::Gguf(q, _) => match q.as_ref() {
            QMatMul::QTensor(t) => t.shape().dims2().ok(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2().ok(),
        },
        Linear::Packed(..) => None,
    }
}

/// The experts' biases (each expert's parts concatenated) as f32 `[experts, rows]`:
/// Some(None) when no layer has one, None when only some do.
fn stacked_bias(parts: &[Vec<&Linear>]) -> Result<Option<Option<Tensor>>> {
    let layers = || parts.iter().flatten();
    if layers().all(|l| l.bias().is_none()) {
        return Ok(Some(None));
    }
    let Some(biases) = parts
        .iter()
        .map(|p| p.iter().map(|l| l.bias().cloned()).collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let per_expert = biases.iter().map(|b| Tensor::cat(b, 0)).collect::<Result<Vec<_>>>()?;
    Ok(Some(Some(
        Tensor::stack(&per_expert, 0)?.to_dtype(DType::F32)?.contiguous()?,
    )))
}
