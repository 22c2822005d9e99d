//! One CPU layout for every quantized weight format: per row, unsigned levels (4 bits, two per
//! byte, or 8 bits) with an f32 scale per group and either an f32 min per group or a zero
//! point, `w = scale · q + min`. GGUF blocks (Q4_0 … Q6_K) and MLX affine weights are repacked
//! into it once at load, so one kernel family (`kernels`) multiplies them all, reading each
//! weight once per step for every row of the batch.
//!
//! Rows are padded to a multiple of 64 values (padding levels and scales are zero). 4-bit rows
//! keep each run of 64 values as 32 bytes: byte i holds value i (low nibble) and value 32 + i
//! (high nibble), so one 32-byte load and two masks give the 64 values in order.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::kernels;

/// Values per padded run (one 512-bit vector of 8-bit levels).
pub const RUN: usize = 64;
/// Extra scales (and mins) after the last row, so a kernel may load four at once anywhere.
const SCALE_PAD: usize = 4;

/// One decoded row (or block run): a level per value, a scale per group, a min per group for
/// formats that store one.
#[derive(Debug, Default)]
pub struct Levels {
    /// Unsigned levels, one per value.
    pub q: Vec<u8>,
    /// One scale per group.
    pub scales: Vec<f32>,
    /// One min per group (empty for zero-point formats).
    pub mins: Vec<f32>,
}

/// How a matrix's groups turn levels into weights.
#[derive(Debug, Clone, Copy)]
pub struct PackSpec {
    /// Levels fit in 4 bits.
    pub four_bit: bool,
    /// Values per scale (16, 32, or a multiple of 64).
    pub group: usize,
    /// `min = -zero_point · scale` when set; otherwise mins are stored.
    pub zero_point: Option<u8>,
}

/// A quantized `[rows, cols]` matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) padded_cols: usize,
    pub(super) spec: PackSpec,
    pub(super) values: Vec<u8>,
    pub(super) scales: Vec<f32>,
    pub(super) mins: Option<Vec<f32>>,
}

impl PackedMatrix {
    /// Packs `rows` rows of `cols` values, row `o` decoded by `decode(o, levels)` (called in
    /// parallel, each with an empty `Levels`).
    pub fn from_rows<F>(rows: usize, cols: usize, spec: PackSpec, decode: F) -> Result<Self>
    where
        F: Fn(usize, &mut Levels) + Sync,
    {
        let g = spec.group;
        if !(g == 16 || g == 32 || g.is_multiple_of(RUN)) || !cols.is_multiple_of(g) {
            candle_core::bail!("cannot pack groups of {g} over rows of {cols} values");
        }
        let padded_cols = cols.next_multiple_of(RUN.max(g));
        let groups = padded_cols / g;
        let row_bytes = if spec.four_bit { padded_cols / 2 } else { padded_cols };
        let mut values = vec![0u8; rows * row_bytes];
        let mut scales = vec![0f32; rows * groups + SCALE_PAD];
        // Mins are kept only by formats that store them; zero-point formats drop them.
        let mut mins = vec![0f32; rows * groups + SCALE_PAD];
        let bad_row = values
            .par_chunks_mut(row_bytes.max(1))
            .zip(scales.par_chunks_mut(groups.max(1)))
            .zip(mins.par_chunks_mut(groups.max(1)))
            .enumerate()
            .map_init(Levels::default, |levels, (o, ((bytes, row_scales), row_mins))| {
                levels.q.clear();
                levels.scales.clear();
                levels.mins.clear();
                decode(o, levels);
                let n = cols / g;
                let fits = levels.q.len() == cols
                    && levels.scales.len() == n
                    && levels.mins.len() == if spec.zero_point.is_some() { 0 } else { n }
                    && (!spec.four_bit || levels.q.iter().all(|&q| q < 16));
                if fits {
                    pack_levels(&levels.q, spec.four_bit, bytes);
                    row_scales[..n].copy_from_slice(&levels.scales);
                    row_mins[..levels.mins.len()].copy_from_slice(&levels.mins);
                }
                (!fits).then_some(o)
            })
            .find_any(|bad| bad.is_some())
            .flatten();
        if let Some(o) = bad_row {
            candle_core::bail!("row {o} did not decode to {cols} levels with its groups");
        }
        Ok(Self {
            rows,
            cols,
            padded_cols,
            spec,
            values,
            scales,
            mins: spec.zero_point.is_none().then_some(mins),
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

    pub(super) fn groups_per_row(&self) -> usize {
        self.padded_cols / self.spec.group
    }

    pub(super) fn row_bytes(&self) -> usize {
        if self.spec.four_bit {
            self.padded_cols / 2
        } else {
            self.padded_cols
        }
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Self {
        let (b, g) = (self.row_bytes(), self.groups_per_row());
        let mut scales = self.scales[start * g..(start + n) * g].to_vec();
        scales.resize(n * g + SCALE_PAD, 0.0);
        Self {
            rows: n,
            values: self.values[start * b..(start + n) * b].to_vec(),
            scales,
            mins: self.mins.as_ref().map(|m| {
                let mut part = m[start * g..(start + n) * g].to_vec();
                part.resize(n * g + SCALE_PAD, 0.0);
                part
            }),
            cols: self.cols,
            padded_cols: self.padded_cols,
            spec: self.spec,
        }
    }

    /// The levels of row `o`, `padded_cols` of them, in order.
    pub(super) fn levels_of_row(&self, o: usize, out: &mut [u8]) {
        let bytes = &self.values[o * self.row_bytes()..(o + 1) * self.row_bytes()];
        if !self.spec.four_bit {
            out.copy_from_slice(bytes);
            return;
        }
        for (run, packed) in out.chunks_exact_mut(RUN).zip(bytes.chunks_exact(RUN / 2)) {
            for (i, &b) in packed.iter().enumerate() {
                run[i] = b & 0x0F;
                run[i + RUN / 2] = b >> 4;
            }
        }
    }

    /// The additive term of group `g` of row `o`.
    pub(super) fn min(&self, o: usize, g: usize) -> f32 {
        let at = o * self.groups_per_row() + g;
        match (&self.mins, self.spec.zero_point) {
            (Some(mins), _) => mins[at],
            (None, zp) => -(zp.unwrap_or(0) as f32) * self.scales[at],
        }
    }

    /// Row `o` as weights, `cols` of them.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let mut levels = vec![0u8; self.padded_cols];
        self.levels_of_row(o, &mut levels);
        let g = self.spec.group;
        for (k, (w, &q)) in out.iter_mut().zip(&levels).enumerate() {
            *w = self.scales[o * self.groups_per_row() + k / g] * q as f32 + self.min(o, k / g);
        }
    }

    /// Rows `ids` as weights, `[ids.len(), cols]` row-major (embedding lookups).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .zip(ids)
            .for_each(|(row, &id)| self.dequantize_row(id as usize, row));
        out
    }

    /// `x · Wᵀ` for `x` of shape `[T, cols]`; returns `[T, rows]` in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (t, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "quantized matmul: input has {cols} columns, weights expect {}",
                self.cols
            );
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let out = kernels::product(self, &xs, t);
        Tensor::from_vec(out, (t, self.rows), x.device())?.to_dtype(x.dtype())
    }
}

/// Writes one row's levels (zero-padded) in the packed layout.
fn pack_levels(q: &[u8], four_bit: bool, out: &mut [u8]) {
    if !four_bit {
        out[..q.len()].copy_from_slice(q);
        return;
    }
    for (c, run) in out.chunks_exact_mut(RUN / 2).enumerate() {
        for (i, byte) in run.iter_mut().enumerate() {
            let at = |k: usize| q.get(c * RUN + k).copied().unwrap_or(0);
            *byte = at(i) | (at(i + RUN / 2) << 4);
        }
    }
}
