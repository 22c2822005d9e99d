//! The CPU matmul kernels against the memory roofline, on the weight shapes of Qwen2.5-0.5B
//! (24 layers of q/k/v/o/gate/up/down plus the 151,936-row output projection).
//!
//! `RAYON_NUM_THREADS=2 RUSTFLAGS="-C target-cpu=native" cargo bench --bench cpu_kernels`
//!
//! First measures the bandwidth of reading a 1 GiB buffer with the same threads, then for each
//! packed format one forward pass worth of products at 1, 8 and 512 activation rows: time,
//! weight bytes read per second and the fraction of measured bandwidth (decode is
//! bandwidth-bound: 1.0 is the roofline), and multiply-adds per second.

mod common;

use std::hint::black_box;

use common::best;
use mlxd::compute::cpu::half::HalfMatrix;
use mlxd::compute::cpu::kernels::{half_product_with, product_with, single_product, Kernel};
use mlxd::compute::cpu::packed::{PackSpec, PackedMatrix};
use mlxd::compute::cpu::single::SingleMatrix;
use rayon::prelude::*;

const HIDDEN: usize = 896;
const KV: usize = 128;
const INTERMEDIATE: usize = 4864;
const VOCAB: usize = 151_936;
const LAYERS: usize = 24;
/// `[out, in]` of one layer's q, k, v, o, gate, up and down projections.
const LAYER_SHAPES: [(usize, usize); 7] = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
];

/// GB/s of summing a 1 GiB buffer on every rayon thread.
fn read_bandwidth() -> f64 {
    let words = vec![1u64; (1 << 30) / 8];
    let time = best(5, || {
        let sum: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a ^ b))
            .sum();
        black_box(sum);
    });
    (words.len() * 8) as f64 / time.as_secs_f64() / 1e9
}

fn matrix(rows: usize, cols: usize, spec: PackSpec, seed: usize) -> PackedMatrix {
    let levels = if spec.four_bit { 16 } else { 256 };
    // Parameters as the files give them: f16 scales for GGUF's Q4_0/Q8_0 and bf16 ones that f16
    // holds for MLX (kept as f16); f16 × int8 products for the K-quants (kept as f32).
    let f16_exact = spec.group != 16 && !(spec.group == 32 && spec.zero_point.is_none());
    let param = |v: f32| if f16_exact { half::f16::from_f32(v).to_f32() } else { v };
    PackedMatrix::from_rows(rows, cols, spec, |o, l| {
        l.q.extend((0..cols).map(|k| ((o * 131 + k * 31 + seed) % levels) as u8));
        l.scales
            .extend((0..cols / spec.group).map(|g| param(1e-3 * (1 + (o + g) % 7) as f32 + 1e-5 * (o % 3) as f32)));
        if spec.zero_point.is_none() {
            l.mins
                .extend((0..cols / spec.group).map(|g| param(-1e-3 * (1 + (o * 3 + g) % 5) as f32)));
        }
    })
    .expect("packs")
}

/// MXFP4's layout: E2M1 codes, levels = doubled values + 12.
const MXFP4: PackSpec = mlxd::formats::mxfp4::SPEC;

/// The layout of a format without a codebook.
fn spec(four_bit: bool, group: usize, zero_point: Option<u8>) -> PackSpec {
    PackSpec {
        four_bit,
        group,
        zero_point,
        codebook: None,
    }
}

/// One small product per layout on the detected kernel, compared with the portable one.
fn smoke() {
    for spec in [
        spec(false, 32, Some(128)),
        spec(true, 32, Some(8)),
        spec(true, 64, None),
        MXFP4,
    ] {
        let m = matrix(70, 128, spec, 1);
        let x: Vec<f32> = (0..3 * 128).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let (got, want) = (
            product_with(Kernel::detect(), &m, &x, 3),
            product_with(Kernel::Portable, &m, &x, 3),
        );
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
    }
    println!("cpu_kernels: every layout multiplies (run `cargo bench --bench cpu_kernels` to time them)");
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench` (a debug build): check that
    // every layout multiplies, once and small, instead of timing the full model.
    if !std::env::args().any(|a| a == "--bench") {
        smoke();
        return;
    }
    // Words after `--` pick formats by name (`cargo bench --bench cpu_kernels -- F16 MLX`).
    let picked: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| picked.is_empty() || picked.iter().any(|p| name.contains(p.as_str()));
    let bandwidth = read_bandwidth();
    println!(
        "threads {}, kernel {:?}, read bandwidth {bandwidth:.1} GB/s",
        rayon::current_num_threads(),
        Kernel::detect()
    );
    let formats = [
        ("Q8_0", spec(false, 32, Some(128))),
        ("Q4_0", spec(true, 32, Some(8))),
        ("Q4_K", spec(true, 32, None)),
        ("Q6_K", spec(false, 16, Some(32))),
        ("MLX 4-bit g64", spec(true, 64, None)),
        ("MLX 8-bit g64", spec(false, 64, None)),
        ("MXFP4", MXFP4),
    ];
    println!("format          rows  ms/pass   weight GB/s  of roofline  GMAC/s");
    for (name, spec) in formats.into_iter().filter(|(name, _)| wanted(name)) {
        let layers: Vec<PackedMatrix> = (0..LAYERS)
            .flat_map(|l| {
                LAYER_SHAPES
                    .iter()
                    .enumerate()
                    .map(move |(i, &(r, c))| (l * 7 + i, r, c))
            })
            .map(|(seed, r, c)| matrix(r, c, spec, seed))
            .collect();
        let head = matrix(VOCAB, HIDDEN, spec, 999);
        for rows in [1, 8, 512] {
            // A prefill computes the output projection for its last row only.
            let head_rows = if rows > 8 { 1 } else { rows };
            let input = |cols: usize, n: usize| -> Vec<f32> {
                (0..n * cols).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect()
            };
            let inputs: Vec<Vec<f32>> = layers.iter().map(|m| input(m.in_dim(), rows)).collect();
            let head_input = input(HIDDEN, head_rows);
            let tries = if rows > 8 { 2 } else { 5 };
            let time = best(tries, || {
                for (m, x) in layers.iter().zip(&inputs) {
                    black_box(product_with(Kernel::detect(), m, x, rows));
                }
                black_box(product_with(Kernel::detect(), &head, &head_input, head_rows));
            });
            let read: usize = layers.iter().map(PackedMatrix::bytes).sum::<usize>() + head.bytes();
            let macs: usize = layers.iter().map(|m| m.out_dim() * m.in_dim() * rows).sum::<usize>()
                + head.out_dim() * head.in_dim() * head_rows;
            let secs = time.as_secs_f64();
            let gbs = read as f64 / secs / 1e9;
            println!(
                "{name:<15} {rows:>4}  {:>7.2}  {gbs:>11.1}  {:>11.2}  {:>6.1}",
                secs * 1e3,
                gbs / bandwidth,
                macs as f64 / secs / 1e9
            );
        }
    }
    if wanted("F16") {
        half_rows(bandwidth);
    }
    if wanted("F32") {
        single_rows(bandwidth);
    }
}

/// The f16 kernel on the same shapes (2 bytes per weight).
fn half_rows(bandwidth: f64) {
    let half = |rows: usize, cols: usize, seed: usize| {
        let values: Vec<half::f16> = (0..rows * cols)
            .map(|i| half::f16::from_f32(((i * 31 + seed) % 97) as f32 / 970.0 - 0.05))
            .collect();
        HalfMatrix::from_row_major(&values, rows, cols).expect("packs")
    };
    let layers: Vec<(HalfMatrix, usize)> = (0..LAYERS)
        .flat_map(|l| LAYER_SHAPES.iter().map(move |&(r, c)| (half(r, c, l), c)))
        .collect();
    let head = half(VOCAB, HIDDEN, 999);
    for rows in [1, 8, 512] {
        let head_rows = if rows > 8 { 1 } else { rows };
        let inputs: Vec<Vec<f32>> = layers.iter().map(|(_, c)| vec![0.01; rows * c]).collect();
        let head_input = vec![0.01; head_rows * HIDDEN];
        let time = best(if rows > 8 { 2 } else { 5 }, || {
            for ((m, _), x) in layers.iter().zip(&inputs) {
                black_box(half_product_with(Kernel::detect(), m, x, rows));
            }
            black_box(half_product_with(Kernel::detect(), &head, &head_input, head_rows));
        });
        let params: usize = layers.iter().map(|(m, c)| m.out_dim() * c).sum::<usize>() + VOCAB * HIDDEN;
        let macs: usize =
            layers.iter().map(|(m, c)| m.out_dim() * c * rows).sum::<usize>() + VOCAB * HIDDEN * head_rows;
        let secs = time.as_secs_f64();
        let gbs = (params * 2) as f64 / secs / 1e9;
        println!(
            "{:<15} {rows:>4}  {:>7.2}  {gbs:>11.1}  {:>11.2}  {:>6.1}",
            "F16",
            secs * 1e3,
            gbs / bandwidth,
            macs as f64 / secs / 1e9
        );
    }
}

/// The batch-invariant mode's f32 panels on the same shapes (4 bytes per weight), beside
/// candle's gemm (what f32 weights use by default) on the same products.
fn single_rows(bandwidth: f64) {
    let values = |rows: usize, cols: usize, seed: usize| -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 31 + seed) % 97) as f32 / 970.0 - 0.05)
            .collect()
    };
    let layers: Vec<(SingleMatrix, candle_core::Tensor, usize)> = (0..LAYERS)
        .flat_map(|l| LAYER_SHAPES.iter().map(move |&(r, c)| (r, c, l)))
        .map(|(r, c, l)| {
            let v = values(r, c, l);
            let dense = candle_core::Tensor::from_vec(v.clone(), (r, c), &candle_core::Device::Cpu).expect("tensor");
            (
                SingleMatrix::from_row_major(&v, r, c).expect("packs"),
                dense.t().expect("t"),
                c,
            )
        })
        .collect();
    let params: usize = layers.iter().map(|(m, _, c)| m.out_dim() * c).sum();
    for rows in [1, 8, 512] {
        let inputs: Vec<Vec<f32>> = layers.iter().map(|(_, _, c)| vec![0.01; rows * c]).collect();
        let tensors: Vec<candle_core::Tensor> = inputs
            .iter()
            .zip(&layers)
            .map(|(x, (_, _, c))| {
                candle_core::Tensor::from_vec(x.clone(), (rows, *c), &candle_core::Device::Cpu).expect("tensor")
            })
            .collect();
        let tries = if rows > 8 { 2 } else { 5 };
        let panels = best(tries, || {
            for ((m, _, _), x) in layers.iter().zip(&inputs) {
                black_box(single_product(m, x, rows));
            }
        });
        let gemm = best(tries, || {
            for ((_, wt, _), x) in layers.iter().zip(&tensors) {
                black_box(x.matmul(wt).expect("matmul"));
            }
        });
        for (name, time) in [("F32 panels", panels), ("F32 gemm", gemm)] {
            let secs = time.as_secs_f64();
            let gbs = (params * 4) as f64 / secs / 1e9;
            println!(
                "{name:<15} {rows:>4}  {:>7.2}  {gbs:>11.1}  {:>11.2}  {:>6.1}",
                secs * 1e3,
                gbs / bandwidth,
                (params * rows) as f64 / secs / 1e9
            );
        }
    }
}
