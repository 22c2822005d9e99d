//! mlxd's own CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs`) and their launches.
//!
//! On a GPU a decode step is bound by kernel launches, not by arithmetic: candle spends ~10 µs
//! per op and a layer built from plain ops issues ~32 of them. These kernels fuse the chains a
//! layer repeats (bias + q/k norm + rope + KV write; attention over the paged cache; residual
//! add + RMSNorm; gated activation), so a layer is ~9 launches, and attention reads K/V where
//! the cache keeps them instead of gathering a copy of every context.
//!
//! Arguments are passed as raw device addresses: every tensor a kernel touches is held by the
//! caller until the launch is queued, and candle frees memory in stream order, so a buffer is
//! never reused before the kernel that reads it has run.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Result, Shape, Storage, Tensor};

use super::batch::BatchInput;
use super::paged_kv::LayerKv;
use super::sampling::{DeviceSample, DeviceSampleRow};
use super::Numerics;

pub mod moe;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Largest head dimension the kernels hold in registers and shared memory.
pub const MAX_HEAD_DIM: usize = 256;
/// Query rows (token × head) one attention block processes.
const MAX_ROWS: usize = 16;
/// Shared memory an attention block may use without opting in to more (bytes).
const ATTENTION_SHARED_BYTES: usize = 48 * 1024;
/// Attention blocks that keep a large GPU busy (about two per SM of an H100/H200); a step
/// with fewer splits each context's keys over more blocks.
const BUSY_BLOCKS: usize = 256;
/// The fewest keys worth a block of their own when splitting a context.
const MIN_KEYS_PER_SPLIT: usize = 16;
/// Most blocks one context is split over (`MAX_SPLITS` in kernels.cu: one per lane when the
/// parts are combined).
const MAX_SPLITS: usize = 32;
/// A sequence feeding at least this many tokens in a step attends through the tensor-core
/// prefill kernel (where the layer allows it).
const PREFILL_MIN_TOKENS: usize = 16;
/// Tokens per tile of the prefill kernel (its 4 warps hold 16 query rows each).
const PREFILL_TILE_TOKENS: usize = 64;
/// Largest head dimension of the prefill kernel.
const PREFILL_MAX_HEAD_DIM: usize = 128;

/// The kernel name for `dtype` (`<name>_bf16` ...).
fn kernel_name(name: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("mlxd's CUDA kernels do not take {other:?} tensors"),
    };
    Ok(format!("{name}_{suffix}"))
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("expected a CUDA tensor, found one on {other:?}"),
    }
}

/// The device address of `t`'s first element. `t` must be row-contiguous in its last dim.
fn address(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("expected a CUDA tensor");
    };
    let stream = cs.device.cuda_stream();
    let (base, size) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::F16(s) => (s.device_ptr(&stream).0, 2),
        CudaStorageSlice::BF16(s) => (s.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::U8(s) => (s.device_ptr(&stream).0, 1),
        _ => bail!("mlxd's CUDA kernels do not take {:?} tensors", t.dtype()),
    };
    Ok(base + (layout.start_offset() * size) as u64)
}

/// Address of an optional tensor, 0 (a null pointer) when absent.
fn address_or_null(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), address)
}

/// Elements between consecutive rows of a 2-D view whose rows are contiguous.
fn row_stride(t: &Tensor) -> Result<u32> {
    let stride = t.stride();
    if t.rank() != 2 || stride[1] != 1 {
        bail!(
            "expected a 2-D view with contiguous rows, got shape {:?} strides {stride:?}",
            t.dims()
        );
    }
    Ok(stride[0] as u32)
}

/// A new uninitialised tensor the kernel fills completely.
fn output(device: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    // SAFETY: every caller launches a kernel that writes every element before the tensor is
    // read.
    let storage: CudaStorage = unsafe { device.alloc_uninit(&shape, dtype)? };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// A kernel: its base name and, for the templated ones, the dtype it is instantiated for.
type KernelKey = (&'static str, Option<DType>);

thread_local! {
    /// Loaded kernel handles: looking one up in candle's module store costs a lock, a string
    /// and a driver call per launch.
    static FUNCTIONS: RefCell<HashMap<(DeviceId, KernelKey), CudaFunction>> = RefCell::new(HashMap::new());
}

/// Queues `name` (dtype-suffixed) with `args` on the device's stream.
fn launch(device: &CudaDevice, name: &'static str, dtype: DType, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    launch_named(device, (name, Some(dtype)), cfg, args)
}

/// Queues `name`, a kernel with one signature for every dtype.
fn launch_untyped(device: &CudaDevice, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    launch_named(device, (name, None), cfg, args)
}

fn launch_named(device: &CudaDevice, kernel: KernelKey, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let key = (device.id(), kernel);
    let func = match FUNCTIONS.with(|f| f.borrow().get(&key).cloned()) {
        Some(func) => func,
        None => {
            let name = match kernel.1 {
                Some(dtype) => kernel_name(kernel.0, dtype)?,
                None => kernel.0.to_string(),
            };
            let func = device
                .get_or_load_custom_func(&name, "mlxd_kernels", ptx::KERNELS)?
                .into_cuda_function();
            FUNCTIONS.with(|f| f.borrow_mut().insert(key, func.clone()));
            func
        }
    };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    for arg in args {
        match arg {
            Arg::Ptr(p) => builder.arg(p),
            Arg::U32(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
        };
    }
    // SAFETY: argument lists match the kernels' signatures in kernels.cu (checked by the GPU
    // tests), and every address belongs to a tensor the caller holds.
    unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    Ok(())
}

/// Copies `data` into the start of the u32 tensor `dst` (stream-ordered): how inputs reach
/// buffers whose addresses a captured CUDA graph has baked in.
pub fn upload_into(dst: &Tensor, data: &[u32]) -> Result<()> {
    if dst.dtype() != DType::U32 || !dst.is_contiguous() || dst.elem_count() < data.len() {
        bail!(
            "upload of {} u32 values into a {:?} tensor of {:?}",
            data.len(),
            dst.dtype(),
            dst.dims()
        );
    }
    let device = cuda_device(dst)?;
    let stream = device.cuda_stream();
    // SAFETY: `dst` is a live contiguous u32 allocation of at least `data.len()` elements; a
    // copy from pageable host memory has read `data` when the call returns.
    unsafe { cudarc::driver::result::memcpy_htod_async(address(dst)?, data, stream.cu_stream()) }
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    Ok(())
}

/// One kernel argument.
enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

fn grid(blocks: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// Rotary tables, the positions to rotate to, and how pairs are formed.
pub struct RopeTables<'a> {
    /// `[max_positions, rotary_dim / 2]` cosines, in the compute dtype.
    pub cos: &'a Tensor,
    /// Sines, same shape.
    pub sin: &'a Tensor,
    /// `[T]` u32: each token's position.
    pub positions: &'a Tensor,
    /// Leading dims of each head that rotate.
    pub rotary_dim: usize,
    /// Pairs `(2i, 2i+1)` instead of `(i, i + rotary_dim/2)`.
    pub interleaved: bool,
}

/// This step's projected q, k and v (2-D views `[T, heads * head_dim]`, rows contiguous), a
/// bias not yet added (q, k, v concatenated) and per-head norm weights (f32).
pub struct RawQkv<'a> {
    /// Queries.
    pub q: &'a Tensor,
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// `[(hq + 2 hkv) * d]` bias, or none.
    pub bias: Option<&'a Tensor>,
    /// q_norm and k_norm weights `[d]` (f32) and epsilon.
    pub norms: Option<(&'a Tensor, &'a Tensor, f32)>,
    /// Query heads, KV heads, head dimension.
    pub heads: (usize, usize, usize),
}

/// Adds the bias, normalizes and rotates q and k, writes k and v into their KV slots and
/// returns rotated q `[T, hq, d]`.
pub fn qkv_store(raw: &RawQkv, rope: &RopeTables, kv: &LayerKv, plan: &StepPlan) -> Result<Tensor> {
    let (hq, hkv, d) = raw.heads;
    if d > MAX_HEAD_DIM {
        bail!("head dimension {d} exceeds the CUDA kernels' {MAX_HEAD_DIM}");
    }
    let device = cuda_device(raw.q)?;
    let dtype = raw.q.dtype();
    let t = raw.q.dim(0)?;
    let q_out = output(&device, (t, hq, d), dtype)?;
    let (q_norm, k_norm, eps) = match raw.norms {
        Some((qn, kn, eps)) => (Some(qn), Some(kn), eps),
        None => (None, None, 0.0),
    };
    let args = [
        Arg::Ptr(address(raw.q)?),
        Arg::Ptr(address(raw.k)?),
        Arg::Ptr(address(raw.v)?),
        Arg::U32(row_stride(raw.q)?),
        Arg::U32(row_stride(raw.k)?),
        Arg::U32(row_stride(raw.v)?),
        Arg::Ptr(address_or_null(raw.bias)?),
        Arg::Ptr(address_or_null(q_norm)?),
        Arg::Ptr(address_or_null(k_norm)?),
        Arg::F32(eps),
        Arg::Ptr(address(rope.cos)?),
        Arg::Ptr(address(rope.sin)?),
        Arg::Ptr(address(rope.positions)?),
        Arg::Ptr(address(&plan.slot_mapping)?),
        Arg::Ptr(address(&q_out)?),
        Arg::Ptr(address(&kv.k)?),
        Arg::Ptr(address(&kv.v)?),
        Arg::U32(t as u32),
        Arg::U32(hq as u32),
        Arg::U32(hkv as u32),
        Arg::U32(d as u32),
        Arg::U32(rope.rotary_dim as u32),
        Arg::U32(rope.interleaved as u32),
    ];
    let warps = t * (hq + hkv);
    launch(&device, "qkv_store", dtype, grid(warps.div_ceil(4), 128, 0), &args)?;
    Ok(q_out)
}

/// How the attention kernel splits the work of one model: query heads per block (a divisor of
/// the heads sharing one KV head) and tokens per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AttentionTiling {
    /// Query heads one block attends (they share one KV head).
    heads_per_block: usize,
    /// Consecutive tokens of one sequence per tile.
    tokens_per_tile: usize,
}

impl AttentionTiling {
    /// The tiling for `num_heads` query heads over `num_kv_heads` KV heads.
    fn new(num_heads: usize, num_kv_heads: usize) -> Self {
        let n_rep = num_heads / num_kv_heads;
        let heads_per_block = (1..=n_rep.min(MAX_ROWS))
            .rev()
            .find(|h| n_rep.is_multiple_of(*h))
            .unwrap_or(1);
        Self {
            heads_per_block,
            tokens_per_tile: MAX_ROWS / heads_per_block,
        }
    }

    /// Tiles of a step as the kernels read them: `[n, 4]` u32 rows {first token row, tokens,
    /// offset of the sequence's context in the slot list, position of the first token}; every
    /// sequence in `paged_attention`'s tiles, and, when some sequence feeds at least
    /// PREFILL_MIN_TOKENS tokens, those in `prefill_attention`'s 64-token tiles beside the
    /// others in `paged_attention`'s.
    fn tiles(&self, q_lens: &[usize], kv_lens: &[usize], device: &Device) -> Result<StepTiles> {
        let (mut all, mut short, mut long) = (Vec::new(), Vec::new(), Vec::new());
        let (mut q_start, mut ctx_start) = (0, 0);
        for (&q_len, &kv_len) in q_lens.iter().zip(kv_lens) {
            let first_pos = kv_len - q_len;
            let push = |rows: &mut Vec<u32>, per_tile: usize| {
                for t in (0..q_len).step_by(per_tile) {
                    let n = per_tile.min(q_len - t);
                    rows.extend([q_start + t, n, ctx_start, first_pos + t].map(|v| v as u32));
                }
            };
            push(&mut all, self.tokens_per_tile);
            if q_len >= PREFILL_MIN_TOKENS {
                push(&mut long, PREFILL_TILE_TOKENS);
            } else {
                push(&mut short, self.tokens_per_tile);
            }
            q_start += q_len;
            ctx_start += kv_len;
        }
        let table = |rows: Vec<u32>| {
            let n = rows.len() / 4;
            Tensor::from_vec(rows, (n, 4), device)
        };
        let prefill = match long.is_empty() {
            true => None,
            false => Some(PrefillTiles {
                long: table(long)?,
                short: (!short.is_empty()).then(|| table(short)).transpose()?,
            }),
        };
        Ok(StepTiles {
            tiles: table(all)?,
            max_keys: kv_lens.iter().copied().max().unwrap_or(0),
            prefill,
        })
    }
}

/// A step's tiles split for the tensor-core prefill kernel: the long sequences' 64-token tiles,
/// and `paged_attention`'s tiles of the others (None: there are none).
#[derive(Debug)]
struct PrefillTiles {
    long: Tensor,
    short: Option<Tensor>,
}

/// One step's attention tiles (see [`AttentionTiling::tiles`]).
#[derive(Debug)]
pub struct StepTiles {
    tiles: Tensor,
    /// The longest context of the step (or that its buffers can hold): what the split of the
    /// keys over blocks is sized for.
    max_keys: usize,
    /// The same step split for `prefill_attention`, when a sequence feeds many tokens.
    prefill: Option<PrefillTiles>,
}

/// What every layer's kernels need from one step's batch.
#[derive(Debug)]
pub struct StepPlan {
    slot_mapping: Tensor,
    context_slots: Tensor,
    tiles: StepTiles,
    tiling: AttentionTiling,
    /// `BatchInvariant`: every row on `paged_attention`, its keys never split (the tensor-core
    /// prefill kernel and the split count depend on the step's shape).
    numerics: Numerics,
}

impl StepPlan {
    /// The plan for `batch` on a model with `num_heads` query and `num_kv_heads` KV heads: tiles
    /// built from the batch's lengths, or a fixed batch's sequence table as it is (each of its
    /// sequences has one token).
    pub fn new(batch: &BatchInput, num_heads: usize, num_kv_heads: usize, numerics: Numerics) -> Result<Self> {
        let tiling = AttentionTiling::new(num_heads, num_kv_heads);
        let tiles = match &batch.fixed {
            Some(fixed) => StepTiles {
                tiles: fixed.seqs.clone(),
                max_keys: fixed.max_context,
                prefill: None,
            },
            None => tiling.tiles(&batch.q_lens, &batch.kv_lens, batch.slot_mapping.device())?,
        };
        Ok(Self {
            slot_mapping: batch.slot_mapping.clone(),
            context_slots: batch.context_slots.clone(),
            tiles,
            tiling,
            numerics,
        })
    }
}

/// How one layer attends, as the attention kernel takes it.
#[derive(Clone, Copy, Debug)]
pub struct LayerAttention<'a> {
    /// KV heads.
    pub num_kv_heads: usize,
    /// Multiplier of q·k.
    pub scale: f32,
    /// `cap · tanh(score / cap)`.
    pub softcap: Option<f32>,
    /// Attend only to the last `window` positions.
    pub window: Option<usize>,
    /// One f32 sink logit per query head (gpt-oss).
    pub sinks: Option<&'a Tensor>,
}

/// Causal attention of every query row over its sequence's context, read from the cache in
/// place through the plan's context slots. `q`: `[T, hq, d]`; returns `[T, hq * d]`. Sequences
/// that feed many tokens (prefill) attend on the tensor cores where the layer allows it (half
/// dtypes, head dims that are multiples of 16 up to 128, no soft-capping or sinks) and the
/// plan is not batch invariant.
pub fn paged_attention(q: &Tensor, kv: &LayerKv, plan: &StepPlan, layer: LayerAttention) -> Result<Tensor> {
    let (t, hq, d) = q.dims3()?;
    if d > MAX_HEAD_DIM {
        bail!("head dimension {d} exceeds the CUDA kernels' {MAX_HEAD_DIM}");
    }
    let device = cuda_device(q)?;
    let dtype = q.dtype();
    let q = q.contiguous()?;
    let out = output(&device, (t, hq * d), dtype)?;
    let fastest = plan.numerics == Numerics::Fastest;
    let tensor_cores = fastest
        && tensor_core_prefill()
        && matches!(dtype, DType::F16 | DType::BF16)
        && d % 16 == 0
        && d <= PREFILL_MAX_HEAD_DIM
        && layer.softcap.is_none()
        && layer.sinks.is_none();
    match plan.tiles.prefill.as_ref().filter(|_| tensor_cores) {
        Some(prefill) => {
            prefill_attention(&q, kv, plan, &layer, &prefill.long, &out)?;
            if let Some(short) = &prefill.short {
                // A subset of the rows: no key splits, whose combine pass rewrites every row.
                tile_attention(&q, kv, plan, &layer, short, false, &out)?;
            }
        }
        None => tile_attention(&q, kv, plan, &layer, &plan.tiles.tiles, fastest, &out)?,
    }
    Ok(out)
}

/// Whether prefill tiles attend on the tensor cores: the default, since it passed
/// `scripts/test-gpu.sh check` on an H100 and its teacher-forced logprobs are as close to a
/// float32 run as the scalar kernel's (benches/prefill_vs_f32.py); `MLXD_CUDA_PREFILL_KERNEL=0`
/// keeps every row on `paged_attention`.
fn tensor_core_prefill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MLXD_CUDA_PREFILL_KERNEL").is_none_or(|v| v != "0"))
}

/// `prefill_attention` over `tiles` (64-token tiles, one block per tile and query head),
/// writing their rows of `out`.
fn prefill_attention(
    q: &Tensor,
    kv: &LayerKv,
    plan: &StepPlan,
    layer: &LayerAttention,
    tiles: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let (_, hq, d) = q.dims3()?;
    let device = cuda_device(q)?;
    let shared = 2 * PREFILL_TILE_TOKENS * (d + 8) * q.dtype().size_in_bytes();
    let args = [
        Arg::Ptr(address(q)?),
        Arg::Ptr(address(&kv.k)?),
        Arg::Ptr(address(&kv.v)?),
        Arg::Ptr(address(&plan.context_slots)?),
        Arg::Ptr(address(tiles)?),
        Arg::Ptr(address(out)?),
        Arg::U32(hq as u32),
        Arg::U32(layer.num_kv_heads as u32),
        Arg::U32(d as u32),
        Arg::F32(layer.scale),
        Arg::U32(layer.window.unwrap_or(0) as u32),
    ];
    let cfg = LaunchConfig {
        grid_dim: (tiles.dim(0)? as u32, hq as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    launch(&device, "prefill_attention", q.dtype(), cfg, &args)
}

/// `paged_attention` (the kernel) over `tiles`, writing their rows of `out`: up to 16 rows of
/// one KV head's query heads per block, K/V tiles in f32 shared memory, and (`may_split`, when
/// `tiles` are every row of the step and the plan is not batch invariant) the keys split over
/// more blocks (flash-decoding) when the step has too few.
#[allow(clippy::too_many_arguments)]
fn tile_attention(
    q: &Tensor,
    kv: &LayerKv,
    plan: &StepPlan,
    layer: &LayerAttention,
    tiles: &Tensor,
    may_split: bool,
    out: &Tensor,
) -> Result<()> {
    let LayerAttention {
        num_kv_heads,
        scale,
        softcap,
        window,
        sinks,
    } = *layer;
    let (step, tiling) = (&plan.tiles, plan.tiling);
    let (t, hq, d) = q.dims3()?;
    let device = cuda_device(q)?;
    let dtype = q.dtype();
    // K/V tile size: as many keys (at most 64) as fit beside the 16 query rows.
    let floats = ATTENTION_SHARED_BYTES / 4;
    let kt = ((floats - MAX_ROWS * d) / (2 * (d + 1))).min(64);
    let shared = 4 * (MAX_ROWS * d + 2 * kt * (d + 1));
    let blocks = (tiles.dim(0)?, hq / tiling.heads_per_block);
    // Too few blocks to fill the GPU: split each context's key tiles over more blocks.
    let keys = window.map_or(step.max_keys, |w| step.max_keys.min(w + tiling.tokens_per_tile));
    let splits = match may_split {
        true => BUSY_BLOCKS
            .div_ceil(blocks.0 * blocks.1)
            .min(keys.div_ceil(MIN_KEYS_PER_SPLIT))
            .clamp(1, MAX_SPLITS),
        false => 1,
    };
    let partial = match splits {
        1 => None,
        n => Some(output(&device, (n, t * hq, d + 2), DType::F32)?),
    };
    let args = [
        Arg::Ptr(address(q)?),
        Arg::Ptr(address(&kv.k)?),
        Arg::Ptr(address(&kv.v)?),
        Arg::Ptr(address(&plan.context_slots)?),
        Arg::Ptr(address(tiles)?),
        Arg::Ptr(address(out)?),
        Arg::Ptr(address_or_null(partial.as_ref())?),
        Arg::U32(t as u32),
        Arg::U32(hq as u32),
        Arg::U32(num_kv_heads as u32),
        Arg::U32(d as u32),
        Arg::U32(tiling.heads_per_block as u32),
        Arg::U32(kt as u32),
        Arg::U32(splits as u32),
        Arg::F32(scale),
        Arg::F32(softcap.unwrap_or(0.0)),
        Arg::U32(window.unwrap_or(0) as u32),
        Arg::Ptr(address_or_null(sinks)?),
    ];
    let cfg = LaunchConfig {
        grid_dim: (blocks.0 as u32, blocks.1 as u32, splits as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    launch(&device, "paged_attention", dtype, cfg, &args)?;
    if let Some(partial) = &partial {
        let rows = t * hq;
        let args = [
            Arg::Ptr(address(partial)?),
            Arg::Ptr(address(out)?),
            Arg::U32(rows as u32),
            Arg::U32(d as u32),
            Arg::U32(splits as u32),
        ];
        launch(
            &device,
            "attention_combine",
            dtype,
            grid(rows.div_ceil(4), 128, 0),
            &args,
        )?;
    }
    Ok(())
}

/// `sum = x + delta` (when `delta` is given) and `rms_norm(sum) * weight` in one pass over each
/// row; returns `(sum, normed)` (`sum` is `x` itself without a delta). `weight` is f32.
pub fn add_rms_norm(x: &Tensor, delta: Option<&Tensor>, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let x = x.contiguous()?;
    let delta = delta.map(Tensor::contiguous).transpose()?;
    let (rows, cols) = x.dims2()?;
    let normed = output(&device, (rows, cols), dtype)?;
    let sum = match delta {
        Some(_) => output(&device, (rows, cols), dtype)?,
        None => x.clone(),
    };
    let args = [
        Arg::Ptr(address(&x)?),
        Arg::Ptr(address_or_null(delta.as_ref())?),
        Arg::Ptr(address(weight)?),
        Arg::Ptr(address(&sum)?),
        Arg::Ptr(address(&normed)?),
        Arg::U32(cols as u32),
        Arg::F32(eps),
    ];
    let threads = cols.div_ceil(32).clamp(1, 32) as u32 * 32;
    launch(&device, "add_rms_norm", dtype, grid(rows, threads, 0), &args)?;
    Ok((sum, normed))
}

/// `x · Wᵀ` for `x` `[m, k]` and a dense `w` `[n, k]` (bf16 or f16), each row's sums in one
/// order whatever `m` is: moe.cuh's tensor-core product with row tiles of 16 (at most 16 rows)
/// or 64, whose per-row arithmetic is the same in either. cuBLAS picks its algorithm, tiles and
/// split-K by the batch's size, so under `--deterministic` dense layers multiply here.
pub fn row_invariant_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k || w.dtype() != dtype || !matches!(dtype, DType::BF16 | DType::F16) {
        bail!(
            "row-invariant matmul of {:?} {:?} by {:?} {:?}: needs bf16 or f16 alike and matching widths",
            x.dims(),
            dtype,
            w.dims(),
            w.dtype()
        );
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let c = output(&device, (m, n), dtype)?;
    if m == 0 {
        return Ok(c);
    }
    let (name, bm) = if m <= 16 {
        ("row_gemm_m16", 16)
    } else {
        ("row_gemm_m64", 64)
    };
    let args = [
        Arg::Ptr(address(&x)?),
        Arg::Ptr(address(&w)?),
        Arg::Ptr(address(&c)?),
        Arg::U32(m as u32),
        Arg::U32(n as u32),
        Arg::U32(k as u32),
    ];
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(moe::TILE_COLS) as u32, m.div_ceil(bm) as u32, 1),
        block_dim: (moe::GEMM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(&device, name, dtype, cfg, &args)?;
    Ok(c)
}

/// `act(gate) * up` of a gated MLP (2-D views with contiguous rows); `gelu` picks the tanh
/// GELU instead of SiLU.
pub fn gated_act(gate: &Tensor, up: &Tensor, gelu: bool) -> Result<Tensor> {
    let device = cuda_device(gate)?;
    let dtype = gate.dtype();
    let (rows, cols) = gate.dims2()?;
    let out = output(&device, (rows, cols), dtype)?;
    let args = [
        Arg::Ptr(address(gate)?),
        Arg::Ptr(address(up)?),
        Arg::Ptr(address(&out)?),
        Arg::U32(rows as u32),
        Arg::U32(cols as u32),
        Arg::U32(row_stride(gate)?),
        Arg::U32(row_stride(up)?),
        Arg::U32(gelu as u32),
    ];
    let blocks = (rows * cols).div_ceil(256).min(65_535);
    launch(&device, "gated_act", dtype, grid(blocks, 256, 0), &args)?;
    Ok(out)
}

/// Top logprobs the sampling kernel reports per row (`MAX_TOP` in kernels.cu).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The next token of every row of `logits` (`[S, vocab]` f32, adjusted in place) chosen on the
/// device; only ids and requested logprobs are copied back.
pub fn sample_rows(logits: &Tensor, rows: &[DeviceSampleRow]) -> Result<Vec<DeviceSample>> {
    let (s, vocab) = logits.dims2()?;
    if s != rows.len() || logits.dtype() != DType::F32 || !logits.is_contiguous() {
        bail!(
            "sampling {} rows from logits {:?} {:?}",
            rows.len(),
            logits.dims(),
            logits.dtype()
        );
    }
    let device = cuda_device(logits)?;
    let on_device = Device::Cuda(device.clone());
    let (mut params_f, mut params_u) = (Vec::with_capacity(6 * s), Vec::with_capacity(5 * s));
    // One dummy entry keeps the adjustment and mask buffers non-empty; no row points at it.
    let (mut adj_tokens, mut adj_values) = (vec![0u32], vec![0f32, 0.0]);
    let mask_words = vocab.div_ceil(32);
    let (mut masks, mut mask_rows) = (vec![0u32; mask_words], 1u32);
    for row in rows {
        params_f.extend([
            row.temperature,
            row.top_p,
            row.min_p,
            row.uniform,
            row.repetition_penalty,
            0.0,
        ]);
        let logprobs = row
            .logprobs
            .map_or(0, |n| 1 + (n as usize).min(MAX_TOP_LOGPROBS) as u32);
        let mask_row = match &row.allowed {
            Some(words) => {
                let start = masks.len();
                masks.extend(words.iter().take(mask_words));
                masks.resize(start + mask_words, 0);
                mask_rows += 1;
                mask_rows - 1
            }
            None => u32::MAX,
        };
        params_u.extend([
            row.top_k,
            logprobs,
            adj_tokens.len() as u32,
            row.adjust.len() as u32,
            mask_row,
        ]);
        for a in &row.adjust {
            adj_tokens.push(a.token);
            adj_values.extend([if a.repeat { 1.0 } else { 0.0 }, a.add]);
        }
    }
    let params_f = Tensor::from_vec(params_f, (s, 6), &on_device)?;
    let params_u = Tensor::from_vec(params_u, (s, 5), &on_device)?;
    let masks = Tensor::from_vec(masks, (mask_rows as usize, mask_words), &on_device)?;
    let saved = output(&device, adj_tokens.len(), DType::F32)?;
    let adj_tokens = Tensor::from_vec(adj_tokens, saved.dim(0)?, &on_device)?;
    let adj_values = Tensor::from_vec(adj_values, (saved.dim(0)?, 2), &on_device)?;
    let ids = output(&device, (s, 1 + MAX_TOP_LOGPROBS), DType::U32)?;
    let lps = output(&device, (s, 1 + MAX_TOP_LOGPROBS), DType::F32)?;
    let args = [
        Arg::Ptr(address(logits)?),
        Arg::U32(vocab as u32),
        Arg::Ptr(address(&params_f)?),
        Arg::Ptr(address(&params_u)?),
        Arg::Ptr(address(&adj_tokens)?),
        Arg::Ptr(address(&adj_values)?),
        Arg::Ptr(address(&saved)?),
        Arg::Ptr(address(&masks)?),
        Arg::U32(mask_words as u32),
        Arg::Ptr(address(&ids)?),
        Arg::Ptr(address(&lps)?),
    ];
    launch_untyped(&device, "sample_rows", grid(s, 1024, 0), &args)?;
    let (ids, lps) = (ids.to_vec2::<u32>()?, lps.to_vec2::<f32>()?);
    Ok(rows
        .iter()
        .zip(ids.into_iter().zip(lps))
        .map(|(row, (ids, lps))| {
            let n = row.logprobs.map_or(0, |n| (n as usize).min(MAX_TOP_LOGPROBS));
            DeviceSample {
                id: ids[0],
                logprob: row.logprobs.map(|_| lps[0]),
                top: (1..=n).map(|j| (ids[j], lps[j])).collect(),
            }
        })
        .collect())
}
