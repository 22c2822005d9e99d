//! f16 weights on the CPU (GGUF F16), kept f16 (half the bytes of f32) in panels of 16 rows:
//! for each column a panel holds its 16 rows' values side by side, so a kernel widens one
//! 32-byte load to 16 f32 lanes (one per output row) and multiplies it with each activation
//! row's value of that column, broadcast. Activations are rounded to f16 first, as llama.cpp's
//! F16 matmul does. Rows are padded to a multiple of 64 (four panels) with zeros.

use candle_core::{DType, Result, Tensor};
use half::f16;
use rayon::prelude::*;

use super::kernels;
use super::packed::{PAD, PANEL};

/// An f16 `[rows, cols]` matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) panels: usize,
    /// Per panel and column, 16 values (one per row).
    pub(super) values: Vec<f16>,
}

impl HalfMatrix {
    /// Packs a row-major `[rows, cols]` matrix given as f16 values.
    pub fn from_row_major(values: &[f16], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols {
            candle_core::bail!("{} f16 values for a [{rows}, {cols}] matrix", values.len());
        }
        let panels = rows.next_multiple_of(PAD) / PANEL;
        let mut packed = vec![f16::ZERO; panels * cols * PANEL];
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
        Ok(Self {
            rows,
            cols,
            panels,
            values: packed,
        })
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
        Self::from_row_major(&values, n, self.cols)
    }

    /// `x · Wᵀ` for `x` of shape `[T, cols]`; returns `[T, rows]` in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (t, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!("f16 matmul: input has {cols} columns, weights expect {}", self.cols);
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let out = kernels::half_product(self, &xs, t);
        Tensor::from_vec(out, (t, self.rows), x.device())?.to_dtype(x.dtype())
    }
}
