//! CPU attention over the paged KV cache (f32 and f16) on Qwen2.5-0.5B's heads (14 query heads, 2 KV
//! heads of 64), 24 layers per pass, for the shapes a server meets: decode batches at short and
//! long contexts, a prompt prefilled from scratch, and short prompt tails over a cached prefix.
//!
//! `RAYON_NUM_THREADS=2 RUSTFLAGS="-C target-cpu=native" cargo bench --bench cpu_attention`
//!
//! Prints ms per pass and the multiply-adds per second of the visible (causal) score and value
//! products.

mod common;

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use mlxd::compute::attention::{attend, AttentionMeta, AttentionOpts, HeadDims};
use mlxd::compute::batch::BatchInput;
use mlxd::compute::paged_kv::LayerKv;
use mlxd::compute::Numerics;

use common::best;

const DIMS: HeadDims = HeadDims {
    num_heads: 14,
    num_kv_heads: 2,
    head_dim: 64,
};
const LAYERS: usize = 24;

/// A step of sequences `(new tokens, context length)` whose context slots interleave.
fn step(seqs: &[(usize, usize)]) -> BatchInput {
    let t = |v: Vec<u32>| {
        let n = v.len();
        Tensor::from_vec(v, n, &Device::Cpu).expect("tensor")
    };
    let (mut ctx, mut slots, mut pos) = (vec![], vec![], vec![]);
    for (i, &(q_len, kv_len)) in seqs.iter().enumerate() {
        let slot = |p: usize| (1 + p * seqs.len() + i) as u32;
        ctx.extend((0..kv_len).map(slot));
        slots.extend((kv_len - q_len..kv_len).map(slot));
        pos.extend((kv_len - q_len..kv_len).map(|p| p as u32));
    }
    BatchInput {
        token_ids: t(vec![0; slots.len()]),
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

fn noise(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 2.0)
        .collect()
}

/// Times one pass (`layers` calls) of attention for `seqs` over a cache of `kv_dtype`; returns
/// (ms, GMAC/s).
fn run(seqs: &[(usize, usize)], kv_dtype: DType, (layers, tries): (usize, usize)) -> (f64, f64) {
    let batch = step(seqs);
    let tokens: usize = seqs.iter().map(|s| s.0).sum();
    let slots = 1 + seqs.len() * seqs.iter().map(|s| s.1).max().unwrap_or(0);
    let kv_w = DIMS.num_kv_heads * DIMS.head_dim;
    let cache = |seed| {
        Tensor::from_vec(noise(slots * kv_w, seed), (slots, kv_w), &Device::Cpu)
            .and_then(|t| t.to_dtype(kv_dtype))
            .expect("kv")
    };
    let kv = LayerKv {
        k: cache(1),
        v: cache(2),
    };
    let q = Tensor::from_vec(
        noise(tokens * DIMS.num_heads * DIMS.head_dim, 3),
        (tokens, DIMS.num_heads, DIMS.head_dim),
        &Device::Cpu,
    )
    .expect("q");
    let meta = AttentionMeta::new(&batch, DIMS, &[None], DType::F32, Numerics::Fastest).expect("plan");
    let opts = AttentionOpts {
        scale: 0.125,
        window: None,
        softcap: None,
        sinks: None,
    };
    let time = best(tries, || {
        for _ in 0..layers {
            black_box(attend(&q, &kv, &meta, &opts).expect("attends"));
        }
    });
    // Query i of a sequence sees kv_len - q_len + i + 1 keys; two products of head_dim each.
    let visible: usize = seqs
        .iter()
        .map(|&(q, k)| (0..q).map(|i| k - q + i + 1).sum::<usize>())
        .sum();
    let macs = visible * DIMS.num_heads * DIMS.head_dim * 2 * layers;
    let secs = time.as_secs_f64();
    (secs * 1e3, macs as f64 / secs / 1e9)
}

fn main() {
    // Under `cargo test --all-targets` (no `--bench`): every shape once, one layer.
    let timed = std::env::args().any(|a| a == "--bench");
    let repeats = if timed { (LAYERS, 5) } else { (1, 1) };
    let cases: [(&str, Vec<(usize, usize)>); 6] = [
        ("decode, 1 x 256 context", vec![(1, 256)]),
        ("decode, 8 x 256 context", vec![(1, 256); 8]),
        ("decode, 8 x 1024 context", vec![(1, 1024); 8]),
        ("decode, 64 x 512 context", vec![(1, 512); 64]),
        ("prefill, 512-token prompt", vec![(512, 512)]),
        ("8 x 8-token tails, 1000 cached", vec![(8, 1000); 8]),
    ];
    println!("threads {}", rayon::current_num_threads());
    println!(
        "{:<32} {:>13} {:>10} {:>13} {:>10}",
        "shape", "f32 ms/pass", "GMAC/s", "f16 ms/pass", "GMAC/s"
    );
    for (name, seqs) in cases {
        let (ms, gmacs) = run(&seqs, DType::F32, repeats);
        let (ms16, gmacs16) = run(&seqs, DType::F16, repeats);
        println!("{name:<32} {ms:>13.2} {gmacs:>10.1} {ms16:>13.2} {gmacs16:>10.1}");
    }
}
