//! f32 weights on the CPU (f32 checkpoints) in the f16 layout's panels of 16 rows: each output
//! is one chain of fused multiply-adds over the columns in order (`kernels::single_product`),
//! so its value is the same whichever other rows share the product and whichever kernel the
//! CPU runs (what the batch-invariant mode needs), and it beats candle's gemm 1.7-3.1× on the
//! 0.5B shapes (`cargo bench --bench cpu_kernels -- F32`).

use candle_core::Result;

use super::half::to_panels;
use super::packed::PANEL;

/// An f32 `[rows, cols]` matrix in the panel layout.
#[derive(Debug, Clone)]
pub struct SingleMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) panels: usize,
    /// Per panel and column, 16 values (one per row).
    pub(super) values: Vec<f32>,
}

impl SingleMatrix {
    /// Packs a row-major `[rows, cols]` matrix.
    pub fn from_row_major(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols {
            candle_core::bail!("{} f32 values for a [{rows}, {cols}] matrix", values.len());
        }
        let (panels, values) = to_panels(values, rows, cols, 0.0);
        Ok(Self {
            rows,
            cols,
            panels,
            values,
        })
    }

    /// Output rows.
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn in_dim(&self) -> usize {
        self.cols
    }

    /// Row `o`'s values.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let panel = &self.values[(o / PANEL) * self.cols * PANEL..];
        for (k, w) in out.iter_mut().enumerate().take(self.cols) {
            *w = panel[k * PANEL + o % PANEL];
        }
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Result<Self> {
        let mut values = vec![0f32; n * self.cols];
        for (i, row) in values.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(start + i, row);
        }
        Self::from_row_major(&values, n, self.cols)
    }

    /// One matrix whose rows are those of `parts` in order (fusing projections that read the
    /// same input), or None unless they share their columns and every part but the last fills
    /// whole panels (so the panels just follow one another).
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let (all_but_last, _) = parts.split_at(parts.len() - 1);
        let fits =
            parts.iter().all(|p| p.cols == first.cols) && all_but_last.iter().all(|p| p.rows == p.panels * PANEL);
        fits.then(|| Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            panels: parts.iter().map(|p| p.panels).sum(),
            values: parts.iter().flat_map(|p| p.values.iter().copied()).collect(),
        })
    }
}
