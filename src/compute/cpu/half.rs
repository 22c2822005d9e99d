//! f16 weights on the CPU (GGUF F16, and dense bf16/f16 checkpoints), kept f16 (half the bytes
//! of f32) in panels of 16 rows: for each column a panel holds its 16 rows' values side by
//! side, so a kernel widens one 32-byte load to 16 f32 lanes (one per output row) and
//! multiplies it with each activation row's value of that column, broadcast. For GGUF F16 the
//! activations are rounded to f16 first, as llama.cpp's F16 matmul does; dense checkpoints keep
//! them f32. Rows are padded to a multiple of 64 (four panels) with zeros.

use candle_core::Result;
use half::f16;
use rayon::prelude::*;

use super::packed::{PAD, PANEL};

/// An f16 `[rows, cols]` matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) panels: usize,
    /// Per panel and column, 16 values (one per row).
    pub(super) values: Vec<f16>,
    /// Activations are rounded to f16 before the product (llama.cpp's F16 matmul, which GGUF
    /// F16 follows).
    pub(super) rounds_inputs: bool,
}

impl HalfMatrix {
    /// Packs a row-major `[rows, cols]` matrix given as f16 values.
    pub fn from_row_major(values: &[f16], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols {
            candle_core::bail!("{} f16 values for a [{rows}, {cols}] matrix", values.len());
        }
        let (panels, packed) = to_panels(values, rows, cols, f16::ZERO);
        Ok(Self {
            rows,
            cols,
            panels,
            values: packed,
            rounds_inputs: true,
        })
    }

    /// A dense row-major f32 matrix, when f16 holds it: every value exactly, except below f16's
    /// normal range (|w| < 2⁻¹⁴), where the error is at most 2⁻²⁵. So bf16 and f16 checkpoints
    /// (which a CPU loads widened to f32) qualify, f32 ones in general do not. Activations stay
    /// f32. None when some value does not fit.
    pub fn from_f32_if_exact(values: &[f32], rows: usize, cols: usize) -> Result<Option<Self>> {
        const MIN_NORMAL: f32 = 6.103_515_6e-5;
        let fits = values
            .par_iter()
            .all(|&v| f16::from_f32(v).to_f32() == v || v.abs() < MIN_NORMAL);
        if !fits {
            return Ok(None);
        }
        let halves: Vec<f16> = values.par_iter().map(|&v| f16::from_f32(v)).collect();
        let mut matrix = Self::from_row_major(&halves, rows, cols)?;
        matrix.rounds_inputs = false;
        Ok(Some(matrix))
    }

    /// Output rows.
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Row `o` widened to f32.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let panel = &self.values[(o / PANEL) * self.cols * PANEL..];
        for (k, w) in out.iter_mut().enumerate().take(self.cols) {
            *w = panel[k * PANEL + o % PANEL].to_f32();
        }
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Result<Self> {
        let mut row = vec![0f32; self.cols];
        let mut values = Vec::with_capacity(n * self.cols);
        for o in start..start + n {
            self.dequantize_row(o, &mut row);
            values.extend(row.iter().map(|&v| f16::from_f32(v)));
        }
        let mut part = Self::from_row_major(&values, n, self.cols)?;
        part.rounds_inputs = self.rounds_inputs;
        Ok(part)
    }

    /// One matrix whose rows are those of `parts` in order (fusing projections that read the
    /// same input), or None unless they share their columns and input rounding and every part
    /// but the last fills whole panels (so the panels just follow one another).
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let (all_but_last, _) = parts.split_at(parts.len() - 1);
        let fits = parts
            .iter()
            .all(|p| p.cols == first.cols && p.rounds_inputs == first.rounds_inputs)
            && all_but_last.iter().all(|p| p.rows == p.panels * PANEL);
        fits.then(|| Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            panels: parts.iter().map(|p| p.panels).sum(),
            values: parts.iter().flat_map(|p| p.values.iter().copied()).collect(),
            rounds_inputs: first.rounds_inputs,
        })
    }
}

/// A row-major `[rows, cols]` matrix in panels of 16 rows (for each column, the panel's 16
/// values side by side), rows padded with `zero` to a multiple of 64: the layout of the f16
/// and f32 panel kernels. Returns the panel count and the values.
pub(super) fn to_panels<T: Copy + Send + Sync>(values: &[T], rows: usize, cols: usize, zero: T) -> (usize, Vec<T>) {
    let panels = rows.next_multiple_of(PAD) / PANEL;
    let mut packed = vec![zero; panels * cols * PANEL];
    packed
        .par_chunks_mut((cols * PANEL).max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for r in 0..PANEL.min(rows.saturating_sub(p * PANEL)) {
                let row = &values[(p * PANEL + r) * cols..][..cols];
                for (k, &v) in row.iter().enumerate() {
                    panel[k * PANEL + r] = v;
                }
            }
        });
    (panels, packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::HostMatrix;
    use candle_core::Tensor;

    /// A `[rows, cols]` pseudo-random matrix scaled by `scale`.
    fn values(rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 7919) % 2003) as f32 / 2003.0 - 0.5) * scale)
            .collect()
    }

    #[test]
    fn bf16_checkpoints_pack_exactly_and_multiply_like_f32() -> Result<()> {
        let (rows, cols, t) = (70, 96, 5);
        // bf16-rounded weights, some below f16's normal range.
        let mut w: Vec<f32> = values(rows, cols, 0.2)
            .into_iter()
            .map(|v| ::half::bf16::from_f32(v).to_f32())
            .collect();
        w[3] = ::half::bf16::from_f32(1.3e-6).to_f32();
        let m = HalfMatrix::from_f32_if_exact(&w, rows, cols)?.expect("bf16 values fit f16");
        assert!(!m.rounds_inputs, "dense checkpoints keep f32 activations");
        let mut row = vec![0f32; cols];
        for o in 0..rows {
            m.dequantize_row(o, &mut row);
            for (k, (&got, &want)) in row.iter().zip(&w[o * cols..(o + 1) * cols]).enumerate() {
                assert!((got - want).abs() <= 2f32.powi(-25), "({o}, {k}): {got} vs {want}");
            }
        }
        let x = values(t, cols, 3.0);
        let dev = candle_core::Device::Cpu;
        let got = HostMatrix::Half(m).matmul(&Tensor::from_vec(x.clone(), (t, cols), &dev)?)?;
        let want = Tensor::from_vec(x, (t, cols), &dev)?.matmul(&Tensor::from_vec(w, (rows, cols), &dev)?.t()?)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "f16 panels vs f32 matmul: {diff}");
        Ok(())
    }

    #[test]
    fn stacked_parts_multiply_like_the_whole() -> Result<()> {
        let cols = 40;
        let w: Vec<f16> = values(64 + 64 + 37, cols, 0.3).into_iter().map(f16::from_f32).collect();
        let whole = HalfMatrix::from_row_major(&w, 165, cols)?;
        let part = |start: usize, n: usize| HalfMatrix::from_row_major(&w[start * cols..(start + n) * cols], n, cols);
        let (a, b, c) = (part(0, 64)?, part(64, 64)?, part(128, 37)?);
        let stacked = HalfMatrix::stack(&[&a, &b, &c]).expect("whole panels before the last part");
        let x = Tensor::from_vec(values(3, cols, 2.0), (3, cols), &candle_core::Device::Cpu)?;
        let diff = (HostMatrix::Half(stacked).matmul(&x)? - HostMatrix::Half(whole).matmul(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert!(
            HalfMatrix::stack(&[&c, &a]).is_none(),
            "a part with padding rows cannot lead"
        );
        Ok(())
    }

    #[test]
    fn f32_checkpoints_and_out_of_range_values_stay_dense() -> Result<()> {
        assert!(HalfMatrix::from_f32_if_exact(&values(4, 8, 0.2), 4, 8)?.is_none());
        let mut w = vec![0.5f32; 32];
        w[7] = 70000.0;
        assert!(HalfMatrix::from_f32_if_exact(&w, 4, 8)?.is_none(), "beyond f16's range");
        Ok(())
    }
}
