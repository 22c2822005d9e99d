//! A layer's experts on the GPU, stacked, and the launches of `moe.cuh`: the router's choice,
//! the grouping of rows by expert, one grouped product per projection on the tensor cores and
//! the weighted sum, all on the device. No routing reaches the host, so a decode step with
//! experts is captured as a CUDA graph like any other, and every expert's weights are read once
//! per step for all the rows routed to it (a batch of 64 streams reads each active expert once,
//! not once per row). Q8_0 experts stay in their blocks.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{bail, DType, Device, Result, Tensor};

use super::{address, address_or_null, cuda_device, grid, launch, launch_untyped, output, row_stride, Arg};

/// Most experts a layer may have (`MOE_MAX_EXPERTS` in moe.cuh: the router keeps 8 per lane).
pub const MAX_EXPERTS: usize = 256;
/// Most experts per token (`MOE_MAX_TOP_K`).
pub const MAX_TOP_K: usize = 16;
/// Output columns per block of `moe_gemm` (`MOE_BN`).
pub(super) const TILE_COLS: usize = 64;
/// Threads of a `moe_gemm` block (4 warps).
pub(super) const GEMM_THREADS: u32 = 128;

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
pub fn exact_quantized() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MLXD_CUDA_FORCE_DMMV").is_some_and(|v| v != "0"))
}

/// How one projection of every expert is held.
#[derive(Debug)]
pub enum ExpertWeights {
    /// `[experts, rows, cols]` in the compute dtype (bf16 or f16); `cols` a multiple of 8.
    Dense(Tensor),
    /// Every expert's rows of Q8_0 blocks one after the other, as GGUF stores them (u8);
    /// `cols` a multiple of 32.
    Q8_0(Tensor),
}

/// One projection of every expert, each `[rows, cols]`.
#[derive(Debug)]
pub struct ExpertMatrix {
    /// The weights.
    pub weights: ExpertWeights,
    /// Output rows per expert.
    pub rows: usize,
    /// Input width.
    pub cols: usize,
}

/// The gate activation `moe_act` applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GatedActivation {
    /// x · sigmoid(x).
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// gpt-oss: `(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)`, `g = min(gate, limit)`.
    ClampedSwiglu {
        /// Sigmoid gain.
        alpha: f32,
        /// Clamp.
        limit: f32,
    },
}

impl ExpertMatrix {
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

    /// The stacked weights.
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
    activation: GatedActivation,
    experts: usize,
}

impl DeviceExperts {
    /// `experts` experts: `gate_up` (`[gate | up]` rows, `2 · inter` of them, over `hidden`) and
    /// `down` (`hidden` rows over `inter`) held alike, with their biases (f32 `[experts, rows]`)
    /// if any.
    pub fn new(
        gate_up: ExpertMatrix,
        down: ExpertMatrix,
        biases: (Option<Tensor>, Option<Tensor>),
        activation: GatedActivation,
        experts: usize,
    ) -> Result<Self> {
        if gate_up.rows != 2 * down.cols || down.rows != gate_up.cols {
            bail!(
                "grouped experts: gate/up [{}, {}] and down [{}, {}] do not fit together",
                gate_up.rows,
                gate_up.cols,
                down.rows,
                down.cols
            );
        }
        if !matches!(
            (&gate_up.weights, &down.weights),
            (ExpertWeights::Dense(_), ExpertWeights::Dense(_)) | (ExpertWeights::Q8_0(_), ExpertWeights::Q8_0(_))
        ) {
            bail!("grouped experts: gate/up and down are held differently");
        }
        if experts == 0 || experts > MAX_EXPERTS {
            bail!("grouped experts: {experts} experts (at most {MAX_EXPERTS})");
        }
        Ok(Self {
            gate_up,
            down,
            gate_up_bias: biases.0,
            down_bias: biases.1,
            scales: None,
            activation,
            experts,
        })
    }

    /// Each kept expert's weight is multiplied by its scale (Gemma 4's `per_expert_scale`).
    pub fn set_scales(&mut self, scales: &[f32]) -> Result<()> {
        let device = Device::Cuda(cuda_device(self.down.data())?);
        self.scales = Some(Tensor::from_slice(scales, scales.len(), &device)?);
        Ok(())
    }

    /// The block's output `[T, hidden]` for `x` (`[T, hidden]`) routed by the router's
    /// `scores` (`[T, experts]`): each token's `top_k` softmax probabilities, renormalized when
    /// `normalize`.
    pub fn forward(&self, scores: &Tensor, x: &Tensor, top_k: usize, normalize: bool) -> Result<Tensor> {
        let device = cuda_device(x)?;
        let dtype = x.dtype();
        let x = x.contiguous()?;
        let (tokens, hidden) = x.dims2()?;
        if top_k == 0 || top_k > MAX_TOP_K {
            bail!("grouped experts: top-{top_k} routing (at most {MAX_TOP_K})");
        }
        let k = top_k;
        let pairs = tokens * k;
        let scores = scores.to_dtype(DType::F32)?.contiguous()?;
        let ids = output(&device, pairs, DType::U32)?;
        let weights = output(&device, pairs, DType::F32)?;
        let route = [
            Arg::Ptr(address(&scores)?),
            Arg::U32(tokens as u32),
            Arg::U32(self.experts as u32),
            Arg::U32(k as u32),
            Arg::U32(normalize as u32),
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
            GatedActivation::Silu => (0, 0.0, 0.0),
            GatedActivation::GeluTanh => (1, 0.0, 0.0),
            GatedActivation::ClampedSwiglu { alpha, limit } => (2, alpha, limit),
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
