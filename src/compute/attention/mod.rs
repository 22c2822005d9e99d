//! The one paged attention path every model calls, in two steps per layer:
//!
//! 1. [`store_kv`]: bias, per-head q/k norms and rope on this step's projections; K and V are
//!    written into their KV slots (`slot_mapping`) and the rotated queries returned;
//! 2. [`attend`]: causal attention of every query over its sequence's context (grouped-query:
//!    query heads share their KV head), optionally limited to a sliding window and with tanh
//!    soft-capping of the scores.
//!
//! Three implementations behind one [`AttentionMeta`]: on CUDA, mlxd's kernels (through
//! `models::fused`) do step 1 in one launch and step 2 in another, reading K/V from the cache
//! in place; on the CPU with f32 compute, `host` reads the cache in place too (f32, f16 or bf16
//! KV; one online-softmax pass per block of queries); elsewhere (Metal, half compute on the
//! CPU) `gathered` does both in plain candle ops, gathering each context first.

mod gathered;
mod host;
mod kernel;

use candle_core::{DType, Result, Tensor};

use super::batch::BatchInput;
use super::layers::{RmsNorm, RotaryAtPositions};
use super::paged_kv::LayerKv;
use super::Numerics;
use gathered::GatheredPlan;
use host::HostPlan;
use kernel::KernelAttention;

/// Head layout of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadDims {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
}

/// How one layer attends.
#[derive(Clone, Debug)]
pub struct AttentionOpts {
    /// Multiplier of q·k (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Attend only to the last `window` positions (query included).
    pub window: Option<usize>,
    /// `cap · tanh(score / cap)` before masking.
    pub softcap: Option<f64>,
    /// One learned logit per query head (`[heads]`, f32) that joins every softmax as a key
    /// with no value: it takes its share of the probability and returns nothing (gpt-oss's
    /// attention sinks).
    pub sinks: Option<Tensor>,
}

/// This step's q, k and v projections before bias, norms and rope: `[T, heads * head_dim]`
/// views (rows contiguous; they may be column ranges of one fused projection).
pub struct Projected<'a> {
    /// Queries.
    pub q: Tensor,
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
    /// `[(q + k + v widths)]` bias still to add (fused projections keep it out of the matmul).
    pub bias: Option<Tensor>,
    /// The layer's per-head norms of q and k, if it has them.
    pub norms: Option<HeadNorms<'a>>,
}

/// The per-head RMSNorms of q and k (Qwen3, Gemma 3).
#[derive(Clone, Copy)]
pub struct HeadNorms<'a> {
    /// `q_norm`.
    pub q: &'a RmsNorm,
    /// `k_norm`.
    pub k: &'a RmsNorm,
}

/// Per-forward attention bookkeeping, shared by all layers.
#[derive(Debug)]
pub struct AttentionMeta {
    plan: Plan,
}

#[derive(Debug)]
enum Plan {
    /// mlxd's CUDA kernels.
    Kernels(KernelAttention),
    /// The CPU path over the cache in place.
    Host(HostPlan),
    /// Plain candle ops.
    Gathered(GatheredPlan),
}

impl AttentionMeta {
    /// Builds what every layer of this forward needs: the kernels' plan on CUDA, the host plan
    /// on the CPU with f32 compute (`dtype`), otherwise the scatter indices and masks of every window setting
    /// the model uses.
    pub fn new(
        batch: &BatchInput,
        dims: HeadDims,
        windows: &[Option<usize>],
        dtype: DType,
        numerics: Numerics,
    ) -> Result<Self> {
        if let Some(kernels) = KernelAttention::plan(batch, dims, numerics)? {
            return Ok(Self {
                plan: Plan::Kernels(kernels),
            });
        }
        if batch.fixed.is_some() {
            candle_core::bail!("a batch in fixed device buffers needs mlxd's CUDA attention kernels");
        }
        if numerics == Numerics::BatchInvariant && !batch.slot_mapping.device().is_cpu() {
            candle_core::bail!(
                "--deterministic on a GPU attends through mlxd's paged kernel, which does not take this step \
                 (head dim {} above the kernel's limit, or image tokens)",
                dims.head_dim
            );
        }
        if let Some(host) = HostPlan::new(batch, dims, dtype, numerics)? {
            return Ok(Self { plan: Plan::Host(host) });
        }
        Ok(Self {
            plan: Plan::Gathered(GatheredPlan::new(batch, dims, windows, dtype)?),
        })
    }
}

/// Step 1: adds the bias, applies the head norms and rope, writes K and V into their slots and
/// returns the rotated queries `[T, heads, head_dim]`.
pub fn store_kv(p: &Projected, rope: &RotaryAtPositions, kv: &mut LayerKv, meta: &AttentionMeta) -> Result<Tensor> {
    match &meta.plan {
        Plan::Kernels(kernels) => kernels.store_kv(p, rope, kv),
        Plan::Host(plan) => {
            let (q, k, v) = prepared(p, rope, plan.dims())?;
            plan.slots().write(&k, &v, kv)?;
            Ok(q)
        }
        Plan::Gathered(plan) => {
            let (q, k, v) = prepared(p, rope, plan.dims())?;
            plan.slots().write(&k, &v, kv)?;
            Ok(q)
        }
    }
}

/// The rotated queries `[T, heads, head_dim]` of a layer that reads another layer's KV (Gemma
/// 4's shared-KV layers): its head norm and rope on `q` (`[T, heads * head_dim]`, no bias),
/// nothing stored.
pub fn queries(q: &Tensor, norm: Option<&RmsNorm>, rope: &RotaryAtPositions, dims: HeadDims) -> Result<Tensor> {
    let mut q = q.reshape((q.dim(0)?, dims.num_heads, dims.head_dim))?;
    if let Some(norm) = norm {
        q = norm.forward(&q)?;
    }
    rope.apply(&q)?.contiguous()
}

/// Where this step's K/V rows go, for the paths that write them with candle ops: each token's
/// slot repeated across the KV width (`scatter_set` indexes element by element).
#[derive(Debug)]
struct SlotWriter {
    index: Tensor,
}

impl SlotWriter {
    fn new(batch: &BatchInput, dims: HeadDims) -> Result<Self> {
        let kv_width = dims.num_kv_heads * dims.head_dim;
        let index = batch
            .slot_mapping
            .unsqueeze(1)?
            .broadcast_as((batch.num_tokens(), kv_width))?
            .contiguous()?;
        Ok(Self { index })
    }

    /// Writes this step's K/V rows (`[T, kv_heads * head_dim]` each) into their slots, in the
    /// cache's dtype.
    fn write(&self, k: &Tensor, v: &Tensor, kv: &mut LayerKv) -> Result<()> {
        let dtype = kv.k.dtype();
        kv.k.scatter_set(&self.index, &k.to_dtype(dtype)?.contiguous()?, 0)?;
        kv.v.scatter_set(&self.index, &v.to_dtype(dtype)?.contiguous()?, 0)
    }
}

/// Bias, head norms and rope in candle ops: rotated q `[T, heads, head_dim]`, and k and v
/// `[T, kv_heads * head_dim]` ready for their slots.
fn prepared(p: &Projected, rope: &RotaryAtPositions, dims: HeadDims) -> Result<(Tensor, Tensor, Tensor)> {
    let HeadDims {
        num_heads,
        num_kv_heads,
        head_dim,
    } = dims;
    let t = p.q.dim(0)?;
    let (q_w, kv_w) = (num_heads * head_dim, num_kv_heads * head_dim);
    let with_bias = |x: &Tensor, start: usize, len: usize| -> Result<Tensor> {
        match &p.bias {
            Some(b) => x.broadcast_add(&b.narrow(0, start, len)?),
            None => Ok(x.clone()),
        }
    };
    let mut q = with_bias(&p.q, 0, q_w)?.reshape((t, num_heads, head_dim))?;
    let mut k = with_bias(&p.k, q_w, kv_w)?.reshape((t, num_kv_heads, head_dim))?;
    let v = with_bias(&p.v, q_w + kv_w, kv_w)?;
    if let Some(n) = p.norms {
        q = n.q.forward(&q)?;
        k = n.k.forward(&k)?;
    }
    let q = rope.apply(&q)?;
    let k = rope.apply(&k)?.reshape((t, kv_w))?;
    Ok((q, k, v))
}

/// Step 2: attends every sequence's rotated queries (`[T, heads, head_dim]`) over its context.
/// Returns `[T, heads * head_dim]`.
pub fn attend(q: &Tensor, kv: &LayerKv, meta: &AttentionMeta, opts: &AttentionOpts) -> Result<Tensor> {
    match &meta.plan {
        Plan::Kernels(kernels) => kernels.attend(q, kv, opts),
        Plan::Host(plan) => host::attend(q, kv, plan, opts),
        Plan::Gathered(plan) => gathered::attend(q, kv, plan, opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A batch of sequences `(q_len, kv_len)` whose contexts live in scattered slots.
    fn batch(seqs: &[(usize, usize)]) -> BatchInput {
        let dev = Device::Cpu;
        let (mut slots, mut ctx, mut pos) = (vec![], vec![], vec![]);
        for (i, &(q_len, kv_len)) in seqs.iter().enumerate() {
            // Sequence i's position p lives in slot 7 + 3 · (p · 5 + i) (interleaved, not in order).
            let slot = |p: usize| (7 + 3 * (p * seqs.len() + i)) as u32;
            ctx.extend((0..kv_len).map(slot));
            slots.extend((kv_len - q_len..kv_len).map(slot));
            pos.extend((kv_len - q_len..kv_len).map(|p| p as u32));
        }
        let t = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &dev).expect("tensor")
        };
        let tokens = slots.len();
        BatchInput {
            token_ids: t(vec![0; tokens]),
            positions: t(pos),
            slot_mapping: t(slots),
            context_slots: t(ctx),
            q_lens: seqs.iter().map(|s| s.0).collect(),
            kv_lens: seqs.iter().map(|s| s.1).collect(),
            logits_rows: t(vec![0]),
            fixed: None,
            images: None,
        }
    }

    fn noise(n: usize, seed: usize, dims: (usize, usize)) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 2003.0 - 0.5) * 2.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn stored_rows_take_the_cache_dtype() -> Result<()> {
        let dims = HeadDims {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
        };
        let b = batch(&[(2, 2)]);
        let slots = 8 + 3 * 2;
        let mut kv = LayerKv {
            k: Tensor::zeros((slots, 4), DType::F16, &Device::Cpu)?,
            v: Tensor::zeros((slots, 4), DType::F16, &Device::Cpu)?,
        };
        let k = noise(8, 4, (2, 4));
        let v = noise(8, 5, (2, 4));
        SlotWriter::new(&b, dims)?.write(&k, &v, &mut kv)?;
        // The one sequence's positions 0 and 1 live in slots 7 and 10.
        for (got, want) in [(&kv.k, &k), (&kv.v, &v)] {
            let rows = Tensor::cat(&[got.get(7)?, got.get(10)?], 0)?.reshape((2, 4))?;
            assert_eq!(
                rows.to_vec2::<half::f16>()?,
                want.to_dtype(DType::F16)?.to_vec2::<half::f16>()?
            );
        }
        Ok(())
    }

    #[test]
    fn the_host_path_equals_the_gathered_path() -> Result<()> {
        // Head sizes with and without a whole number of 16-lane chunks.
        for head_dim in [32, 20] {
            let dims = HeadDims {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
            };
            let kv_w = dims.num_kv_heads * head_dim;
            // Decode steps, prefill chunks (longer than a query block), a chunk continuing a
            // cached prefix, a lone token, and contexts of several key tiles.
            let shapes: [&[(usize, usize)]; 4] = [
                &[(1, 40), (1, 3), (70, 70), (20, 90), (1, 1)],
                &[(33, 33)],
                &[(1, 130)],
                &[(1, 300), (40, 290)],
            ];
            for seqs in shapes {
                let b = batch(seqs);
                let t = b.num_tokens();
                let longest = seqs.iter().map(|s| s.1).max().unwrap_or(0);
                let slots = 8 + 3 * seqs.len() * longest;
                let q = noise(t * 6 * head_dim, 3, (t, 6 * head_dim)).reshape((t, 6, head_dim))?;
                // The host path reads half KV as its exact f32 values: the gathered path gets
                // those values in f32.
                for kv_dtype in [DType::F32, DType::F16, DType::BF16] {
                    let cache = |seed| noise(slots * kv_w, seed, (slots, kv_w)).to_dtype(kv_dtype);
                    let kv = LayerKv {
                        k: cache(1)?,
                        v: cache(2)?,
                    };
                    let widened = LayerKv {
                        k: kv.k.to_dtype(DType::F32)?,
                        v: kv.v.to_dtype(DType::F32)?,
                    };
                    let sinks = noise(6, 9, (6, 1)).flatten_all()?;
                    let settings = [
                        (None, None, None),
                        (Some(17), None, None),
                        (None, Some(0.7), None),
                        (Some(5), Some(2.0), None),
                        (None, None, Some(sinks.clone())),
                        (Some(17), None, Some((sinks.clone() * 4.0)?)),
                    ];
                    for (window, softcap, sinks) in settings {
                        let with_sinks = sinks.is_some();
                        let opts = AttentionOpts {
                            scale: 0.3,
                            window,
                            softcap,
                            sinks,
                        };
                        let gathered = GatheredPlan::new(&b, dims, &[window], DType::F32)?;
                        let want = gathered::attend(&q, &widened, &gathered, &opts)?;
                        for numerics in [Numerics::Fastest, Numerics::BatchInvariant] {
                            let host = HostPlan::new(&b, dims, DType::F32, numerics)?.expect("CPU f32");
                            let got = host::attend(&q, &kv, &host, &opts)?;
                            let diff = (&want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                            assert!(
                                diff < 2e-5,
                                "hd {head_dim} {seqs:?} {kv_dtype:?} window {window:?} softcap {softcap:?} \
                                 sinks {with_sinks} {numerics:?}: {diff}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn batch_invariant_rows_are_the_same_bits_in_any_batch() -> Result<()> {
        let dims = HeadDims {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 20,
        };
        let (kv_w, q_w, n) = (40, 120, 150);
        // Per position: its key, value and query rows, wherever the batch puts them.
        let keys = noise(n * kv_w, 1, (n, kv_w)).to_vec2::<f32>()?;
        let values = noise(n * kv_w, 2, (n, kv_w)).to_vec2::<f32>()?;
        let queries = noise(n * q_w, 3, (n, q_w)).to_vec2::<f32>()?;
        // The rows of sequence `at` of a batch of `(q_len, kv_len)` sequences.
        let run = |seqs: &[(usize, usize)], at: usize, opts: &AttentionOpts| -> Result<Vec<Vec<u32>>> {
            let b = batch(seqs);
            let longest = seqs.iter().map(|s| s.1).max().unwrap_or(0);
            let slots = 8 + 3 * seqs.len() * longest;
            let (mut k, mut v, mut q) = (vec![0f32; slots * kv_w], vec![0f32; slots * kv_w], Vec::new());
            for (i, &(q_len, kv_len)) in seqs.iter().enumerate() {
                for p in 0..kv_len {
                    let slot = 7 + 3 * (p * seqs.len() + i);
                    k[slot * kv_w..(slot + 1) * kv_w].copy_from_slice(&keys[p]);
                    v[slot * kv_w..(slot + 1) * kv_w].copy_from_slice(&values[p]);
                }
                for query in &queries[kv_len - q_len..kv_len] {
                    q.extend_from_slice(query);
                }
            }
            let t = b.num_tokens();
            let kv = LayerKv {
                k: Tensor::from_vec(k, (slots, kv_w), &Device::Cpu)?,
                v: Tensor::from_vec(v, (slots, kv_w), &Device::Cpu)?,
            };
            let q = Tensor::from_vec(q, (t, 6, 20), &Device::Cpu)?;
            let plan = HostPlan::new(&b, dims, DType::F32, Numerics::BatchInvariant)?.expect("CPU f32");
            let out = host::attend(&q, &kv, &plan, opts)?.to_vec2::<f32>()?;
            let first: usize = seqs[..at].iter().map(|s| s.0).sum();
            Ok(out[first..first + seqs[at].0]
                .iter()
                .map(|row| row.iter().map(|x| x.to_bits()).collect())
                .collect())
        };
        let sinks = noise(6, 9, (6, 1)).flatten_all()?;
        for (window, softcap, sinks) in [
            (None, None, None),
            (Some(17), None, None),
            (Some(70), Some(2.0), None),
            (Some(17), None, Some(sinks)),
        ] {
            let opts = AttentionOpts {
                scale: 0.3,
                window,
                softcap,
                sinks,
            };
            // One prefill chunk of every position.
            let whole = run(&[(n, n)], 0, &opts)?;
            for p in [0, 15, 16, 17, 63, 64, 65, 100, 149] {
                // A decode step alone and among a prefill and another decode.
                assert_eq!(
                    run(&[(1, p + 1)], 0, &opts)?[0],
                    whole[p],
                    "{window:?} position {p} alone"
                );
                let among = run(&[(5, 30), (1, p + 1), (40, 120)], 1, &opts)?;
                assert_eq!(among[0], whole[p], "{window:?} position {p} among others");
            }
            // A chunk continuing a cached prefix, beside a short sequence.
            let chunk = run(&[(1, 9), (50, n)], 1, &opts)?;
            assert_eq!(chunk[..], whole[n - 50..], "{window:?} a later chunk");
        }
        Ok(())
    }
}
