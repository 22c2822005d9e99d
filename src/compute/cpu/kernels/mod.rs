//! `x · Wᵀ` for packed quantized weights on the CPU. Activations are quantized once per product
//! to int8 in blocks with an f16 scale: blocks of 32 (llama.cpp's Q8_0) for weights in groups
//! of up to 32, blocks of 64 for coarser groups (MLX's usual 64; llama.cpp's K-quants likewise
//! quantize activations in blocks of 256), so that one integer span covers a whole weight
//! group and is scaled once; each weight panel (16 rows) is
//! then read once per tile of activation rows and multiplied with integer dot products whose
//! lanes are the panel's rows, scaled in f32 once per block. The instruction set is picked at run
//! time: AVX-512 VNNI where the CPU has it, else AVX-VNNI or AVX2 (256-bit), else a portable
//! kernel (any CPU, arm64 included), so one binary runs everywhere; `MLXD_CPU_KERNEL` pins one.
//!
//! Hand-written: no maintained Rust crate multiplies block-quantized weights with per-block
//! scales (gemm and candle's quantized matmul treat a batch as repeated vector products).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_half;
mod portable;
mod single;

use std::ops::Range;
use std::sync::OnceLock;

use multiversion::multiversion;
use rayon::prelude::*;

use super::half::HalfMatrix;
use super::packed::{PackedMatrix, PANEL};
use super::single::SingleMatrix;

/// Fewest values per activation block (one int8 scale each).
const MIN_BLOCK: usize = 32;
/// Most values per activation block.
const MAX_BLOCK: usize = 64;
/// Panels per task unit: tiles take up to four panels at once.
const PANELS_PER_UNIT: usize = 4;

/// The instruction set a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit integer dot products (`vpdpbusd`).
    Avx512Vnni,
    /// 256-bit integer dot products (`vpdpbusd`, VEX-encoded).
    AvxVnni,
    /// 256-bit AVX2 (`vpmaddubsw` + `vpmaddwd`).
    Avx2,
    /// Plain Rust, for any CPU.
    Portable,
}

impl Kernel {
    /// The kernel products use: the one `MLXD_CPU_KERNEL` names if this CPU runs it, else the
    /// fastest this CPU runs. Chosen once per process.
    pub fn detect() -> Self {
        static CHOSEN: OnceLock<Kernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Self::available();
            let Ok(asked) = std::env::var("MLXD_CPU_KERNEL") else {
                return available[0];
            };
            match available.iter().find(|k| k.name() == asked) {
                Some(&kernel) => kernel,
                None => {
                    let names: Vec<&str> = available.iter().map(|k| k.name()).collect();
                    tracing::warn!(%asked, ?names, "MLXD_CPU_KERNEL names no kernel this CPU runs; using the fastest");
                    available[0]
                }
            }
        })
    }

    /// Every kernel this CPU runs, fastest first (the portable one last).
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                kernels.push(Kernel::Avx512Vnni);
            }
            if avx2::vnni_available() {
                kernels.push(Kernel::AvxVnni);
            }
            if avx2::available() {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels.push(Kernel::Portable);
        kernels
    }

    /// The name `MLXD_CPU_KERNEL` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512vnni",
            Kernel::AvxVnni => "avxvnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }
}

/// A batch of activation rows quantized to int8 blocks for one matrix.
pub(super) struct Activations {
    pub(super) rows: usize,
    pub(super) padded_cols: usize,
    /// Values per block (one scale each).
    pub(super) block: usize,
    /// Values per integer partial dot: a block, or a weight group when groups are finer.
    pub(super) span: usize,
    /// `[rows, padded_cols]` levels.
    pub(super) q: Vec<i8>,
    /// `[rows, padded_cols / block]` block scales.
    pub(super) scales: Vec<f32>,
    /// `[rows, padded_cols / span]`: `-zero_point · Σ levels` of each span, where a
    /// zero-point format's integer dot starts.
    pub(super) starts: Vec<i32>,
    /// `[rows, padded_cols / span]`: `scale · Σ levels` of each span, which formats with
    /// mins multiply by the min.
    pub(super) span_sums: Vec<f32>,
}

impl Activations {
    /// Quantizes `[rows, w.cols]` f32 values for products with `w`.
    pub(super) fn quantize(x: &[f32], rows: usize, w: &PackedMatrix) -> Self {
        let (cols, padded_cols) = (w.cols, w.padded_cols);
        let block = w.spec.group.clamp(MIN_BLOCK, MAX_BLOCK);
        let span = w.spec.group.min(block);
        let spans = padded_cols / span;
        let mut a = Self {
            rows,
            padded_cols,
            block,
            span,
            q: vec![0; rows * padded_cols],
            scales: vec![0.0; rows * padded_cols / block],
            starts: vec![0; rows * spans],
            span_sums: vec![0.0; rows * spans],
        };
        let zero_point = i32::from(w.spec.zero_point.unwrap_or(0));
        a.q.par_chunks_exact_mut(padded_cols.max(1))
            .zip(x.par_chunks_exact(cols.max(1)))
            .zip(a.scales.par_chunks_exact_mut((padded_cols / block).max(1)))
            .zip(a.starts.par_chunks_exact_mut(spans.max(1)))
            .zip(a.span_sums.par_chunks_exact_mut(spans.max(1)))
            .with_min_len(8)
            .for_each(|((((q, src), scales), starts), sums)| {
                quantize_row(src, q, scales);
                for (s, part) in q.chunks_exact(span).enumerate() {
                    let levels: i32 = part.iter().map(|&v| v as i32).sum();
                    starts[s] = -zero_point * levels;
                    sums[s] = scales[s * span / block] * levels as f32;
                }
            });
        a
    }

    /// Spans per row.
    pub(super) fn spans(&self) -> usize {
        self.padded_cols / self.span
    }

    /// Blocks per row.
    pub(super) fn blocks(&self) -> usize {
        self.padded_cols / self.block
    }

    /// The scale of the block holding column `k` of row `m`.
    pub(super) fn scale(&self, m: usize, k: usize) -> f32 {
        self.scales[m * self.blocks() + k / self.block]
    }
}

/// One row of activations to int8 blocks: levels `q` and a scale per block (of `q.len() /
/// scales.len()` values). Compiled for each SIMD level and chosen at run time, like the
/// kernels: a build for baseline x86-64 would otherwise round with a libm call per value.
#[multiversion(targets = "simd")]
fn quantize_row(src: &[f32], q: &mut [i8], scales: &mut [f32]) {
    let size = q.len() / scales.len();
    for ((block, qb), scale) in src.chunks(size).zip(q.chunks_exact_mut(size)).zip(scales.iter_mut()) {
        let d = abs_max(block) / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (l, &v) in qb.iter_mut().zip(block) {
            // Ties to even (one vector instruction) where llama.cpp rounds ties away from zero:
            // the two differ only on exact halves.
            *l = (v * inv).round_ties_even() as i8;
        }
        // The scale is kept as f16, as llama.cpp's Q8_0 blocks keep it.
        *scale = half::f16::from_f32(d).to_f32();
    }
}

/// The largest magnitude in `v`, with independent lanes (vectorizes; NaN is ignored).
#[inline(always)]
fn abs_max(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0f32, |m, x| m.max(x.abs()));
    for c in chunks {
        for (m, x) in lanes.iter_mut().zip(c) {
            let a = x.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// Where products land: `[rows, cols]` written by tasks that own disjoint column ranges.
pub(super) struct Output {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: tasks write disjoint elements (each owns a range of output columns), and the buffer
// outlives every task (`product` joins them before returning it).
unsafe impl Sync for Output {}

impl Output {
    /// Output columns.
    pub(super) fn cols(&self) -> usize {
        self.cols
    }

    /// Writes element `(m, o)`.
    pub(super) fn write(&self, m: usize, o: usize, v: f32) {
        assert!(m < self.rows && o < self.cols, "output element out of range");
        // SAFETY: in bounds (checked), and no other task writes column `o` (see `Sync`).
        unsafe { *self.ptr.add(m * self.cols + o) = v }
    }

    /// Where row `m`'s columns `o..o + n` start, for a kernel's vector store; `o + n` must not
    /// pass the row's end.
    pub(super) fn at(&self, m: usize, o: usize, n: usize) -> *mut f32 {
        assert!(m < self.rows && o + n <= self.cols, "output run out of range");
        // SAFETY: in bounds (checked above); the caller writes only `n` values from here.
        unsafe { self.ptr.add(m * self.cols + o) }
    }
}

/// `x · Wᵀ` for `rows` rows of `x` (`[rows, w.cols]`), `[rows, w.rows]` out.
pub fn product(w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    product_with(Kernel::detect(), w, x, rows)
}

/// `product` on a chosen kernel (tests and benchmarks compare them).
pub fn product_with(kernel: Kernel, w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    let acts = Activations::quantize(x, rows, w);
    over_panels(w.panels, rows, w.rows, |panels, output| {
        product_of_panels(kernel, w, &acts, panels, output)
    })
}

/// The products `x · Wᵀ` of several matrices (`jobs`: a matrix, its `[rows, w.cols]` inputs,
/// their row count), `[rows, w.rows]` each, in one parallel pass over every job's panels: many
/// small products (a step's experts) cost one dispatch and share the threads evenly. Each is
/// the same as its own `product`.
pub fn grouped_product(jobs: &[(&PackedMatrix, &[f32], usize)]) -> Vec<Vec<f32>> {
    let kernel = Kernel::detect();
    let acts: Vec<Activations> = jobs
        .par_iter()
        .map(|&(w, x, rows)| Activations::quantize(x, rows, w))
        .collect();
    // Every element is written below (the tasks cover every panel of every job), so the
    // buffers are not zeroed first.
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|&(w, _, rows)| Vec::with_capacity(rows * w.rows))
        .collect();
    let outputs: Vec<Output> = outs
        .iter_mut()
        .zip(jobs)
        .map(|(out, &(w, _, rows))| Output {
            ptr: out.as_mut_ptr(),
            rows,
            cols: w.rows,
        })
        .collect();
    let units: usize = jobs.iter().map(|(w, _, _)| w.panels / PANELS_PER_UNIT).sum();
    let per_task = units.div_ceil(rayon::current_num_threads() * 8).max(1);
    let tasks: Vec<(usize, Range<usize>)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, (w, _, _))| {
            let units = w.panels / PANELS_PER_UNIT;
            (0..units.div_ceil(per_task)).map(move |t| (j, t * per_task..((t + 1) * per_task).min(units)))
        })
        .collect();
    tasks.par_iter().for_each(|(j, units)| {
        let panels = units.start * PANELS_PER_UNIT..units.end * PANELS_PER_UNIT;
        product_of_panels(kernel, jobs[*j].0, &acts[*j], panels, &outputs[*j]);
    });
    for (out, &(w, _, rows)) in outs.iter_mut().zip(jobs) {
        // SAFETY: the capacity is `rows * w.rows` and every element was written (see above).
        unsafe { out.set_len(rows * w.rows) };
    }
    outs
}

/// Columns `panels` of `x · Wᵀ` for every activation row, on `kernel`.
fn product_of_panels(kernel: Kernel, w: &PackedMatrix, acts: &Activations, panels: Range<usize>, output: &Output) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => avx512::product(w, acts, panels, output),
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => avx2::product::<true>(w, acts, panels, output),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::product::<false>(w, acts, panels, output),
        _ => portable::product(
            w,
            acts,
            (panels.start * PANEL).min(w.rows)..(panels.end * PANEL).min(w.rows),
            output,
        ),
    }
}

/// `x · Wᵀ` for f16 weights, `rows` rows of `x` (`[rows, w.cols]`), `[rows, w.rows]` out.
pub fn half_product(w: &HalfMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    half_product_with(Kernel::detect(), w, x, rows)
}

/// `half_product` on a chosen kernel.
pub fn half_product_with(kernel: Kernel, w: &HalfMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    // Activations rounded to f16 where llama.cpp's F16 matmul rounds them (GGUF F16).
    let rounded: Vec<f32>;
    let x = if w.rounds_inputs {
        rounded = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        &rounded
    } else {
        x
    };
    over_panels(w.panels, rows, w.rows, |panels, output| match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => avx512_half::product(w, x, rows, panels, output),
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni | Kernel::Avx2 => avx2::half_product(w, x, rows, panels, output),
        _ => portable::half_product(
            w,
            x,
            rows,
            (panels.start * PANEL).min(w.rows)..(panels.end * PANEL).min(w.rows),
            output,
        ),
    })
}

/// `x · Wᵀ` for f32 panel weights, `rows` rows of `x` (`[rows, w.cols]`), `[rows, w.rows]`
/// out: each output one fused multiply-add chain over the columns in order, the same bits on
/// every kernel and in any batch (the batch-invariant mode).
pub fn single_product(w: &SingleMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    single_product_with(Kernel::detect(), w, x, rows)
}

/// `single_product` on a chosen kernel (every kernel gives the same bits).
pub fn single_product_with(kernel: Kernel, w: &SingleMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    over_panels(w.panels, rows, w.rows, |panels, output| {
        single::product(kernel, w, x, rows, panels, output)
    })
}

/// Checks that `panels` is a range of whole task units inside a matrix of `total` panels, as
/// `over_panels` hands them out: the kernels' loads rely on it.
fn check_units(panels: &Range<usize>, total: usize) {
    assert!(
        panels.start.is_multiple_of(PANELS_PER_UNIT)
            && panels.len().is_multiple_of(PANELS_PER_UNIT)
            && panels.end <= total,
        "panel ranges come in whole units of the matrix"
    );
}

/// A `[rows, cols]` output computed by tasks that each own a range of whole panel units
/// (`run(panels, output)` writes every column of its panels for every row).
fn over_panels(panels: usize, rows: usize, cols: usize, run: impl Fn(Range<usize>, &Output) + Sync) -> Vec<f32> {
    // Every element is written below (tasks cover every panel; each writes all its columns
    // for every activation row), so the buffer is not zeroed first.
    let mut out: Vec<f32> = Vec::with_capacity(rows * cols);
    let output = Output {
        ptr: out.as_mut_ptr(),
        rows,
        cols,
    };
    let units = panels / PANELS_PER_UNIT;
    let per_task = units.div_ceil(rayon::current_num_threads() * 8).max(1);
    (0..units.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let units = t * per_task..((t + 1) * per_task).min(units);
        run(units.start * PANELS_PER_UNIT..units.end * PANELS_PER_UNIT, &output)
    });
    // SAFETY: the capacity is `rows * cols` and every element was written (see above).
    unsafe { out.set_len(rows * cols) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::packed::{Levels, PackSpec};

    /// A pseudo-random value in [0, 1) from an index.
    fn noise(i: usize) -> f32 {
        ((i as u64).wrapping_mul(2654435761) % 10007) as f32 / 10007.0
    }

    fn matrix(rows: usize, cols: usize, spec: PackSpec) -> PackedMatrix {
        let levels = if spec.four_bit { 16 } else { 256 };
        PackedMatrix::from_rows(rows, cols, spec, |o, l: &mut Levels| {
            l.q.extend((0..cols).map(|k| ((o * 31 + k * 17 + k * k) % levels) as u8));
            let groups = cols / spec.group;
            // f16-exact parameters (kept as f16) for Q4_0/Q8_0/MXFP4-like and group-64 matrices, as
            // GGUF's f16 scales and most MLX parameters are; f32 for the others.
            let half = matches!(spec.zero_point, Some(8 | 12 | 128)) || spec.group == 64;
            let param = |v: f32| if half { ::half::f16::from_f32(v).to_f32() } else { v };
            l.scales
                .extend((0..groups).map(|g| param(0.01 + 0.02 * noise(o * 7 + g))));
            if spec.zero_point.is_none() {
                l.mins
                    .extend((0..groups).map(|g| param(-0.1 + 0.05 * noise(o * 13 + g + 1))));
            }
        })
        .expect("packs")
    }

    fn inputs(rows: usize, cols: usize) -> Vec<f32> {
        // Some large values make block scales differ.
        (0..rows * cols)
            .map(|i| (noise(i + 99) - 0.5) * if i % 37 == 0 { 8.0 } else { 1.0 })
            .collect()
    }

    /// The exact value both kernels compute: dequantized weights times dequantized int8
    /// activations, in f64.
    fn exact(w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f64> {
        let a = Activations::quantize(x, rows, w);
        let mut levels = vec![0u8; w.padded_cols];
        let mut out = vec![0f64; rows * w.rows];
        for o in 0..w.rows {
            w.levels_of_row(o, &mut levels);
            for m in 0..rows {
                let mut y = 0f64;
                for (k, &q) in levels.iter().enumerate().take(w.cols) {
                    let g = k / w.spec.group;
                    let weight = w.scale(o, g) as f64 * q as f64 + w.min(o, g) as f64;
                    let act = a.q[m * w.padded_cols + k] as f64 * a.scale(m, k) as f64;
                    y += weight * act;
                }
                out[m * w.rows + o] = y;
            }
        }
        out
    }

    fn specs() -> Vec<(PackSpec, usize)> {
        let spec = |four_bit, group, zero_point| PackSpec {
            four_bit,
            group,
            zero_point,
            codebook: None,
        };
        // MXFP4: E2M1 codes, levels = doubled values + 12.
        let mxfp4 = PackSpec {
            codebook: Some([12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0]),
            ..spec(true, 32, Some(12))
        };
        vec![
            (spec(true, 32, Some(8)), 96),    // Q4_0, a row not a multiple of 64
            (spec(true, 32, None), 256),      // Q4_K / Q4_1
            (spec(false, 32, Some(128)), 64), // Q8_0
            (spec(false, 16, Some(32)), 256), // Q6_K
            (spec(true, 64, None), 192),      // MLX 4-bit, group 64
            (spec(false, 128, None), 256),    // MLX 8-bit, group 128
            (mxfp4, 160),                     // MXFP4 (GGUF, HF, MLX)
        ]
    }

    #[test]
    fn every_kernel_computes_the_exact_blockwise_product() {
        let kernels = Kernel::available();
        for (spec, cols) in specs() {
            for out_rows in [1, 6, 17, 70] {
                let w = matrix(out_rows, cols, spec);
                for rows in [1, 2, 3, 4, 5, 9, 131] {
                    let x = inputs(rows, cols);
                    let want = exact(&w, &x, rows);
                    for &kernel in &kernels {
                        let got = product_with(kernel, &w, &x, rows);
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            let tol = 1e-4 * (1.0 + e.abs());
                            assert!(
                                (*g as f64 - e).abs() < tol,
                                "{kernel:?} {spec:?} [{rows}x{cols}]·[{out_rows}x{cols}]ᵀ element {i}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn grouped_products_are_each_matrix_s_own_product() {
        for (spec, cols) in specs() {
            let matrices: Vec<PackedMatrix> = [1, 17, 70].iter().map(|&out| matrix(out, cols, spec)).collect();
            let inputs: Vec<(Vec<f32>, usize)> = [3, 1, 9].iter().map(|&rows| (inputs(rows, cols), rows)).collect();
            let jobs: Vec<(&PackedMatrix, &[f32], usize)> = matrices
                .iter()
                .zip(&inputs)
                .map(|(w, (x, rows))| (w, &x[..], *rows))
                .collect();
            let grouped = grouped_product(&jobs);
            for (got, &(w, x, rows)) in grouped.iter().zip(&jobs) {
                assert_eq!(
                    got,
                    &product(w, x, rows),
                    "{spec:?}: bit for bit the matrix's own product"
                );
            }
        }
    }

    #[test]
    fn a_row_s_product_is_the_same_alone_or_among_others() {
        use ::half::f16;
        for &kernel in &Kernel::available() {
            for (spec, cols) in specs() {
                let w = matrix(70, cols, spec);
                let x = inputs(131, cols);
                let all = product_with(kernel, &w, &x, 131);
                for m in [0, 1, 5, 64, 130] {
                    let alone = product_with(kernel, &w, &x[m * cols..(m + 1) * cols], 1);
                    assert_eq!(alone, all[m * 70..(m + 1) * 70], "{kernel:?} {spec:?} row {m}");
                }
            }
            let values: Vec<f16> = (0..70 * 96).map(|i| f16::from_f32(noise(i) - 0.5)).collect();
            let w = HalfMatrix::from_row_major(&values, 70, 96).expect("packs");
            let x = inputs(131, 96);
            let all = half_product_with(kernel, &w, &x, 131);
            for m in [0, 1, 5, 64, 130] {
                let alone = half_product_with(kernel, &w, &x[m * 96..(m + 1) * 96], 1);
                assert_eq!(alone, all[m * 70..(m + 1) * 70], "{kernel:?} f16 row {m}");
            }
        }
    }

    #[test]
    fn f32_panels_are_one_fused_chain_per_output_alone_or_among_others() {
        // 70 rows (a padded last panel) by 45 columns (no multiple of the lanes).
        let (rows, cols) = (70, 45);
        let values: Vec<f32> = (0..rows * cols).map(|i| noise(i) - 0.5).collect();
        let w = SingleMatrix::from_row_major(&values, rows, cols).expect("packs");
        let x = inputs(131, cols);
        for &kernel in &Kernel::available() {
            let all = single_product_with(kernel, &w, &x, 131);
            for m in [0, 1, 3, 4, 5, 6, 7, 8, 64, 130] {
                let xs = &x[m * cols..(m + 1) * cols];
                let alone = single_product_with(kernel, &w, xs, 1);
                assert_eq!(alone, all[m * rows..(m + 1) * rows], "{kernel:?} row {m}");
                for o in 0..rows {
                    let chain = values[o * cols..(o + 1) * cols]
                        .iter()
                        .zip(xs)
                        .fold(0f32, |acc, (&w, &x)| w.mul_add(x, acc));
                    assert_eq!(all[m * rows + o].to_bits(), chain.to_bits(), "{kernel:?} ({m}, {o})");
                }
            }
        }
    }

    #[test]
    fn int8_activations_stay_close_to_the_float_product() {
        for (spec, cols) in specs() {
            let w = matrix(8, cols, spec);
            let x = inputs(3, cols);
            let got = product(&w, &x, 3);
            let mut row = vec![0f32; cols];
            for o in 0..8 {
                w.dequantize_row(o, &mut row);
                for m in 0..3 {
                    let xs = &x[m * cols..(m + 1) * cols];
                    let want: f32 = row.iter().zip(xs).map(|(a, b)| a * b).sum();
                    let scale: f32 = row.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum();
                    let err = (got[m * 8 + o] - want).abs();
                    assert!(
                        err < 0.01 * scale,
                        "{spec:?}: {} vs {want} (scale {scale})",
                        got[m * 8 + o]
                    );
                }
            }
        }
    }

    #[test]
    fn parameters_that_f16_holds_exactly_are_kept_as_f16() {
        use crate::compute::cpu::packed::Params;
        let kinds: Vec<bool> = specs()
            .into_iter()
            .map(|(spec, cols)| matches!(matrix(4, cols, spec).scales, Params::F16(_)))
            .collect();
        assert_eq!(kinds, [true, false, true, false, true, false, true]);
    }

    #[test]
    fn zero_activations_give_exact_zero_products() {
        let w = matrix(5, 96, specs()[0].0);
        assert!(product(&w, &[0.0; 2 * 96], 2).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn split_rows_keep_their_levels_and_groups() {
        for (spec, cols) in specs() {
            let w = matrix(40, cols, spec);
            let part = w.rows(7, 20).expect("splits");
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for o in 0..20 {
                w.dequantize_row(7 + o, &mut a);
                part.dequantize_row(o, &mut b);
                assert_eq!(a, b, "{spec:?} row {o}");
            }
            // Stacking the parts back gives the same rows, and the same products.
            let (head, tail) = (w.rows(0, 7).expect("splits"), w.rows(7, 33).expect("splits"));
            let both = PackedMatrix::stack(&[&head, &tail]).expect("stacks").expect("alike");
            let x = inputs(3, cols);
            assert_eq!(product(&both, &x, 3), product(&w, &x, 3), "{spec:?}");
        }
        let (a, b) = (matrix(4, 64, specs()[2].0), matrix(4, 64, specs()[1].0));
        assert!(
            PackedMatrix::stack(&[&a, &b]).expect("checks").is_none(),
            "different formats stay apart"
        );
    }

    #[test]
    fn f16_kernels_multiply_f16_weights_with_f16_rounded_activations() {
        use ::half::f16;
        let kernels = Kernel::available();
        for (out_rows, cols) in [(1, 8), (17, 96), (70, 40)] {
            let values: Vec<f16> = (0..out_rows * cols).map(|i| f16::from_f32(noise(i) - 0.5)).collect();
            let w = HalfMatrix::from_row_major(&values, out_rows, cols).expect("packs");
            for rows in [1, 2, 3, 5, 9, 12] {
                let x = inputs(rows, cols);
                for &kernel in &kernels {
                    let got = half_product_with(kernel, &w, &x, rows);
                    for m in 0..rows {
                        for o in 0..out_rows {
                            let want: f64 = (0..cols)
                                .map(|k| {
                                    let xk = f16::from_f32(x[m * cols + k]).to_f32();
                                    values[o * cols + k].to_f32() as f64 * xk as f64
                                })
                                .sum();
                            let g = got[m * out_rows + o] as f64;
                            assert!(
                                (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{kernel:?} ({m}, {o}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
