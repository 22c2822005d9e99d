//! `x · Wᵀ` for packed quantized weights on the CPU. Activations are quantized once per product
//! to int8 in blocks of 32 with an f16 scale (llama.cpp's Q8_0), then every weight run is read once and
//! multiplied with all rows of the batch (weight-stationary tiles), integer dot products per
//! block scaled in f32. The instruction set is picked at run time: AVX-512 VNNI where the CPU
//! has it, otherwise a portable kernel (any x86-64, arm64), so one binary runs everywhere.
//!
//! Hand-written: no maintained Rust crate multiplies block-quantized weights with per-block
//! scales (gemm and candle's quantized matmul treat a batch as repeated vector products).

#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::packed::{PackedMatrix, RUN};

/// Values per activation block (one int8 scale each).
const BLOCK: usize = 32;
/// Lanes of a 512-bit integer dot product over one run (each sums 4 adjacent values).
const LANES: usize = 16;

/// The instruction set a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit integer dot products (`vpdpbusd`).
    Avx512Vnni,
    /// Plain Rust, for any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        static CHOSEN: OnceLock<Kernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx512::available() {
                return Kernel::Avx512Vnni;
            }
            Kernel::Portable
        })
    }
}

/// A batch of activation rows quantized to int8 blocks.
pub(super) struct Activations {
    pub(super) rows: usize,
    pub(super) padded_cols: usize,
    /// `[rows, padded_cols]` levels.
    pub(super) q: Vec<i8>,
    /// Per row and run of 64 values, 16 lanes: the first block's scale ×8, the second's ×8
    /// (the lane order of a 512-bit integer dot product).
    pub(super) scale_lanes: Vec<f32>,
    /// Per row and run, 16 lanes: the sum of each lane's 4 levels (weight zero points and
    /// mins multiply them).
    pub(super) lane_sums: Vec<i32>,
}

impl Activations {
    /// Quantizes `[rows, cols]` f32 values, zero-padded to `padded_cols` per row.
    pub(super) fn quantize(x: &[f32], rows: usize, cols: usize, padded_cols: usize) -> Self {
        let lanes_per_row = padded_cols / RUN * LANES;
        let mut a = Self {
            rows,
            padded_cols,
            q: vec![0; rows * padded_cols],
            scale_lanes: vec![0.0; rows * lanes_per_row],
            lane_sums: vec![0; rows * lanes_per_row],
        };
        let quantize_row = |((src, q), (scales, sums))| quantize_row(src, q, scales, sums);
        let rows_iter = x
            .chunks_exact(cols.max(1))
            .zip(a.q.chunks_exact_mut(padded_cols.max(1)))
            .zip(
                a.scale_lanes
                    .chunks_exact_mut(lanes_per_row.max(1))
                    .zip(a.lane_sums.chunks_exact_mut(lanes_per_row.max(1))),
            );
        if rows >= 8 {
            rows_iter.par_bridge().for_each(quantize_row);
        } else {
            rows_iter.for_each(quantize_row);
        }
        a
    }

    /// The scale of block `b` of row `m`.
    pub(super) fn block_scale(&self, m: usize, b: usize) -> f32 {
        self.scale_lanes[(m * self.padded_cols / RUN + b / 2) * LANES + b % 2 * 8]
    }
}

/// One row of activations to int8 blocks: levels `q`, and per run the 16 scale lanes and the
/// 16 lane sums.
fn quantize_row(src: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    for (b, (block, qb)) in src.chunks(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (l, &v) in qb.iter_mut().zip(block) {
            *l = (v * inv).round() as i8;
        }
        // The scale is kept as f16, as llama.cpp's Q8_0 blocks keep it.
        let lanes = b / 2 * LANES + b % 2 * 8..;
        scales[lanes.clone()][..8].fill(half::f16::from_f32(d).to_f32());
        for (s, four) in sums[lanes][..8].iter_mut().zip(qb.chunks_exact(4)) {
            *s = four.iter().map(|&v| v as i32).sum();
        }
    }
}

/// Where products land: `[rows, cols]` written by tasks that own disjoint column ranges.
pub(super) struct Output {
    ptr: *mut f32,
    cols: usize,
    len: usize,
}

// SAFETY: tasks write disjoint elements (each owns a range of output columns), and the buffer
// outlives every task (`product` joins them before returning it).
unsafe impl Sync for Output {}

impl Output {
    /// Writes element `(m, o)`.
    pub(super) fn write(&self, m: usize, o: usize, v: f32) {
        let at = m * self.cols + o;
        assert!(at < self.len && o < self.cols, "output element out of range");
        // SAFETY: in bounds (checked), and no other task writes column `o` (see `Sync`).
        unsafe { *self.ptr.add(at) = v }
    }
}

/// `x · Wᵀ` for `rows` rows of `x` (`[rows, w.cols]`), `[rows, w.rows]` out.
pub fn product(w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    product_with(Kernel::detect(), w, x, rows)
}

/// `product` on a chosen kernel (tests compare them).
pub fn product_with(kernel: Kernel, w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    let acts = Activations::quantize(x, rows, w.cols, w.padded_cols);
    let mut out = vec![0f32; rows * w.rows];
    let output = Output {
        ptr: out.as_mut_ptr(),
        cols: w.rows,
        len: out.len(),
    };
    let chunk = rows_per_task(w.rows);
    let run = |range: Range<usize>| match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => avx512::product(w, &acts, range, &output),
        _ => portable::product(w, &acts, range, &output),
    };
    (0..w.rows.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| run(c * chunk..((c + 1) * chunk).min(w.rows)));
    out
}

/// Output rows per task: about eight tasks per thread for balance, in whole tiles of four.
fn rows_per_task(rows: usize) -> usize {
    let tasks = rayon::current_num_threads() * 8;
    rows.div_ceil(tasks).next_multiple_of(4).max(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::quant::packed::{Levels, PackSpec};

    /// A pseudo-random value in [0, 1) from an index.
    fn noise(i: usize) -> f32 {
        ((i as u64).wrapping_mul(2654435761) % 10007) as f32 / 10007.0
    }

    fn matrix(rows: usize, cols: usize, spec: PackSpec) -> PackedMatrix {
        let levels = if spec.four_bit { 16 } else { 256 };
        PackedMatrix::from_rows(rows, cols, spec, |o, l: &mut Levels| {
            l.q.extend((0..cols).map(|k| ((o * 31 + k * 17 + k * k) % levels) as u8));
            let groups = cols / spec.group;
            l.scales.extend((0..groups).map(|g| 0.01 + 0.02 * noise(o * 7 + g)));
            if spec.zero_point.is_none() {
                l.mins.extend((0..groups).map(|g| -0.1 + 0.05 * noise(o * 13 + g + 1)));
            }
        })
        .expect("packs")
    }

    fn inputs(rows: usize, cols: usize) -> Vec<f32> {
        // One large value per row makes block scales differ.
        (0..rows * cols)
            .map(|i| (noise(i + 99) - 0.5) * if i % 37 == 0 { 8.0 } else { 1.0 })
            .collect()
    }

    /// The exact value both kernels compute: dequantized weights times dequantized int8
    /// activations, in f64.
    fn exact(w: &PackedMatrix, x: &[f32], rows: usize) -> Vec<f64> {
        let a = Activations::quantize(x, rows, w.cols, w.padded_cols);
        let mut levels = vec![0u8; w.padded_cols];
        let mut out = vec![0f64; rows * w.rows];
        for o in 0..w.rows {
            w.levels_of_row(o, &mut levels);
            for m in 0..rows {
                let mut y = 0f64;
                for (k, &q) in levels.iter().enumerate().take(w.cols) {
                    let g = k / w.spec.group;
                    let scale = w.scales[o * w.groups_per_row() + g] as f64;
                    let act = a.q[m * w.padded_cols + k] as f64 * a.block_scale(m, k / BLOCK) as f64;
                    y += (scale * q as f64 + w.min(o, g) as f64) * act;
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
        };
        vec![
            (spec(true, 32, Some(8)), 96),    // Q4_0, a row not a multiple of 64
            (spec(true, 32, None), 256),      // Q4_K / Q4_1
            (spec(false, 32, Some(128)), 64), // Q8_0
            (spec(false, 16, Some(32)), 256), // Q6_K
            (spec(true, 64, None), 192),      // MLX 4-bit, group 64
            (spec(false, 128, None), 256),    // MLX 8-bit, group 128
        ]
    }

    #[test]
    fn every_kernel_computes_the_exact_blockwise_product() {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect() != Kernel::Portable {
            kernels.push(Kernel::detect());
        }
        for (spec, cols) in specs() {
            for out_rows in [1, 6, 13] {
                let w = matrix(out_rows, cols, spec);
                for rows in [1, 2, 3, 4, 5, 9] {
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
    fn zero_and_padded_activations_give_exact_zero_products() {
        let w = matrix(5, 96, specs()[0].0);
        assert!(product(&w, &vec![0.0; 2 * 96], 2).iter().all(|&v| v == 0.0));
    }
}
