//! f32 element-wise work on the CPU that candle would run as several passes over memory (and
//! with libm's scalar exp): the MLP's SiLU·up in one parallel pass, the softmax numerators of
//! the CPU attention, and the exp the compiler vectorizes that both use. The loops are
//! compiled for each SIMD level and picked at run time (`multiversion`), so a binary built for
//! baseline x86-64 still runs them in AVX2 or AVX-512.

use candle_core::{DType, Result, Storage, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per parallel task (a decode step's few rows stay on one thread).
const MIN_TASK: usize = 16 * 1024;

/// `silu(gate) · up` for `[T, I]` f32 tensors on the CPU, in one parallel pass; they may be
/// views with a row stride (the two halves of a fused gate/up product). None for anything else
/// (other devices or dtypes), which the caller computes with candle ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Ok(None);
    }
    let (rows, cols) = gate.dims2()?;
    if up.dims2()? != (rows, cols) {
        candle_core::bail!("silu_mul: gate {:?} and up {:?} differ", gate.shape(), up.shape());
    }
    if rows * cols == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; rows * cols];
    let (gate_storage, gate_layout) = gate.storage_and_layout();
    let (up_storage, up_layout) = up.storage_and_layout();
    let (Storage::Cpu(g), Storage::Cpu(u)) = (&*gate_storage, &*up_storage) else {
        return Ok(None);
    };
    let (Some(g), Some(u)) = (
        rows_of(g.as_slice::<f32>()?, gate_layout),
        rows_of(u.as_slice::<f32>()?, up_layout),
    ) else {
        return Ok(None);
    };
    let rows_per_task = (MIN_TASK / cols.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out_row) in chunk.chunks_exact_mut(cols).enumerate() {
                let row = task * rows_per_task + i;
                silu_mul_row(out_row, g.row(row), u.row(row));
            }
        });
    drop((gate_storage, up_storage));
    Ok(Some(Tensor::from_vec(out, (rows, cols), gate.device())?))
}

/// `out = silu(gate) · up` element by element, compiled for each SIMD level and chosen at run
/// time (a build for baseline x86-64 would not vectorize it).
#[multiversion(targets = "simd")]
fn silu_mul_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(gate).zip(up) {
        *o = x / (1.0 + exp((-x).min(88.0))) * y;
    }
}

/// Replaces every value `x` by `exp(x - shift)` and returns their sum: the numerators of a
/// softmax whose running max is `shift`. Compiled for each SIMD level, chosen at run time.
#[multiversion(targets = "simd")]
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    // Sixteen independent partial sums, so the loop vectorizes.
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x - shift);
            *lane += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x;
    }
    lanes.iter().sum::<f32>() + tail
}

/// Rows of a 2-D view: `cols` values each, `stride` apart from `start`.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    stride: usize,
    cols: usize,
}

impl Rows<'_> {
    fn row(&self, r: usize) -> &[f32] {
        let at = self.start + r * self.stride;
        &self.data[at..at + self.cols]
    }
}

/// The rows of a 2-D layout with unit column stride, or None.
fn rows_of<'a>(data: &'a [f32], layout: &candle_core::Layout) -> Option<Rows<'a>> {
    match (layout.dims(), layout.stride()) {
        (&[rows, cols], &[stride, 1]) => {
            let start = layout.start_offset();
            (rows == 0 || start + (rows - 1) * stride + cols <= data.len()).then_some(Rows {
                data,
                start,
                stride,
                cols,
            })
        }
        _ => None,
    }
}

/// e^x for x ≤ 88 in plain arithmetic the compiler vectorizes:
/// x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its degree-6 Taylor polynomial (relative error
/// below 2e-7), 2^n through the exponent bits; below -87 (and -inf) the result is 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    if x < -87.0 {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vectorizable_exp_matches_the_library_exp() {
        for i in 0..=200_000 {
            let x = -90.0 + 178.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want + 1e-37, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_numerators_and_their_sum_match_the_library_exp() {
        // Lengths below, at and past the 16 lanes, with a tail.
        for n in [1, 15, 16, 37, 64] {
            let values: Vec<f32> = (0..n).map(|i| (i * 37 % 23) as f32 / 3.0 - 4.0).collect();
            let mut got = values.clone();
            let sum = exp_shifted_sum(&mut got, 2.5);
            let want: Vec<f32> = values.iter().map(|x| (x - 2.5).exp()).collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 3e-7 * w, "{n}: {g} vs {w}");
            }
            let want_sum: f32 = want.iter().sum();
            assert!(
                (sum - want_sum).abs() <= 1e-6 * want_sum,
                "{n}: sum {sum} vs {want_sum}"
            );
        }
    }

    #[test]
    fn silu_mul_of_fused_halves_matches_candle() -> Result<()> {
        let (rows, cols) = (37, 300);
        let values: Vec<f32> = (0..rows * 2 * cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 40.0 - 25.0)
            .collect();
        let fused = Tensor::from_vec(values, (rows, 2 * cols), &candle_core::Device::Cpu)?;
        let (gate, up) = (fused.narrow(1, 0, cols)?, fused.narrow(1, cols, cols)?);
        let got = silu_mul(&gate, &up)?.expect("CPU f32");
        let want = (candle_nn::ops::silu(&gate)? * &up)?;
        let err = ((got - &want)?.abs()? / (want.abs()? + 1e-3)?)?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "relative error {err}");
        Ok(())
    }
}
