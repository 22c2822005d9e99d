//! MLX affine quantization (`mlx_lm.convert -q`): per row, groups of `group_size` values
//! `w = scale · q + bias` with `q` packed `bits` at a time into little-endian u32 words.
//!
//! The packed words stay in memory as they are in the file (≈ bits/32 of f32). Products:
//! - few rows of input (decode): each weight row is unpacked once into a small buffer and dotted
//!   with every input row — one pass over the packed matrix, rayon-parallel over output rows;
//! - many rows (prefill): tiles of `PREFILL_TILE_ROWS` weight rows are dequantized to f32 and
//!   multiplied with gemm, so no full-size f32 copy of the matrix ever exists.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Input rows up to which the unpack-and-dot kernel beats dequantize + gemm.
const SMALL_BATCH_ROWS: usize = 16;
/// Weight rows dequantized at once for large inputs (bounded scratch memory).
const PREFILL_TILE_ROWS: usize = 256;

/// One quantized matrix `[out_dim, in_dim]`.
#[derive(Debug, Clone)]
pub struct MlxWeights {
    packed: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    bits: usize,
    group_size: usize,
}

impl MlxWeights {
    /// True when `vb` holds an MLX-quantized module (`weight` packed plus `scales`).
    pub fn present(vb: &VarBuilder) -> bool {
        vb.contains_tensor("scales") && vb.contains_tensor("biases")
    }

    /// Loads `weight` (u32), `scales` and `biases` under `vb`; bits and group size follow from
    /// the shapes, as mlx-lm infers them.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let packed = vb.get_unchecked_dtype("weight", DType::U32)?;
        let scales = vb.get_unchecked_dtype("scales", DType::F32)?;
        let biases = vb.get_unchecked_dtype("biases", DType::F32)?;
        let (rows, words) = packed.dims2()?;
        let (s_rows, groups) = scales.dims2()?;
        if rows != out_dim || s_rows != out_dim || biases.dims2()? != (out_dim, groups) || groups == 0 {
            candle_core::bail!(
                "{}: quantized shapes {:?}/{:?}/{:?} do not fit a [{out_dim}, {in_dim}] matrix",
                vb.prefix(),
                packed.shape(),
                scales.shape(),
                biases.shape()
            );
        }
        let bits = words * 32 / in_dim;
        let group_size = in_dim / groups;
        if words * 32 != bits * in_dim || groups * group_size != in_dim || ![2, 3, 4, 5, 6, 8].contains(&bits) {
            candle_core::bail!(
                "{}: unsupported MLX quantization ({words} words for {in_dim} inputs, {groups} groups); \
                 supported: 2/3/4/5/6/8 bits with groups dividing the row",
                vb.prefix()
            );
        }
        Ok(Self {
            packed: packed.flatten_all()?.to_vec1()?,
            scales: scales.flatten_all()?.to_vec1()?,
            biases: biases.flatten_all()?.to_vec1()?,
            out_dim,
            in_dim,
            bits,
            group_size,
        })
    }

    /// Output rows.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Bits per weight.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Values per scale/bias group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    fn words_per_row(&self) -> usize {
        self.in_dim * self.bits / 32
    }

    fn groups_per_row(&self) -> usize {
        self.in_dim / self.group_size
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Self {
        let (w, g) = (self.words_per_row(), self.groups_per_row());
        Self {
            packed: self.packed[start * w..(start + n) * w].to_vec(),
            scales: self.scales[start * g..(start + n) * g].to_vec(),
            biases: self.biases[start * g..(start + n) * g].to_vec(),
            out_dim: n,
            ..self.clone_shape()
        }
    }

    fn clone_shape(&self) -> Self {
        Self {
            packed: Vec::new(),
            scales: Vec::new(),
            biases: Vec::new(),
            ..*self
        }
    }

    /// The unsigned integers of row `o`, into `q` (length `in_dim`).
    fn unpack_row(&self, o: usize, q: &mut [f32]) {
        let words = &self.packed[o * self.words_per_row()..(o + 1) * self.words_per_row()];
        match self.bits {
            4 => unpack_fixed::<4, 8>(words, q),
            8 => unpack_fixed::<8, 4>(words, q),
            bits => {
                // Little-endian bit stream; values may straddle word boundaries.
                let mask = (1u64 << bits) - 1;
                for (i, v) in q.iter_mut().enumerate() {
                    let bit = i * bits;
                    let (word, shift) = (bit / 32, bit % 32);
                    let lo = words[word] as u64;
                    let hi = words.get(word + 1).copied().unwrap_or(0) as u64;
                    *v = (((lo | (hi << 32)) >> shift) & mask) as f32;
                }
            }
        }
    }

    /// Dequantized row `o` into `out` (length `in_dim`).
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        self.unpack_row(o, out);
        let g = self.groups_per_row();
        for (k, group) in out.chunks_exact_mut(self.group_size).enumerate() {
            let (s, b) = (self.scales[o * g + k], self.biases[o * g + k]);
            for v in group {
                *v = s * *v + b;
            }
        }
    }

    /// Rows `ids` dequantized, `[ids.len(), in_dim]` row-major (embedding lookups).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.in_dim];
        out.par_chunks_mut(self.in_dim)
            .zip(ids)
            .for_each(|(row, &id)| self.dequantize_row(id as usize, row));
        out
    }

    /// `x · Wᵀ` for `x` of shape `[T, in_dim]`; returns `[T, out_dim]` in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (t, in_dim) = x.dims2()?;
        if in_dim != self.in_dim {
            candle_core::bail!(
                "quantized matmul: input has {in_dim} columns, weights expect {}",
                self.in_dim
            );
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let out = if t <= SMALL_BATCH_ROWS {
            let xs: Vec<f32> = x32.flatten_all()?.to_vec1()?;
            Tensor::from_vec(self.matmul_small(&xs, t), (t, self.out_dim), x.device())?
        } else {
            self.matmul_tiled(&x32, x.device())?
        };
        out.to_dtype(dtype)
    }

    /// One pass over the packed rows: `out[t, o] = Σ_g s·(x_g·q_g) + b·Σx_g`.
    fn matmul_small(&self, xs: &[f32], t: usize) -> Vec<f32> {
        let (in_dim, gs, g) = (self.in_dim, self.group_size, self.groups_per_row());
        // Per input row and group: Σ x (the bias term).
        let xsum: Vec<f32> = xs.chunks_exact(gs).map(|c| c.iter().sum()).collect();
        let mut out_t = vec![0f32; self.out_dim * t]; // [out, T]: each row owned by one task
        out_t.par_chunks_mut(t).enumerate().for_each_init(
            || vec![0f32; in_dim],
            |q, (o, out_row)| {
                self.unpack_row(o, q);
                let (scales, biases) = (&self.scales[o * g..(o + 1) * g], &self.biases[o * g..(o + 1) * g]);
                for (ti, acc) in out_row.iter_mut().enumerate() {
                    let x = &xs[ti * in_dim..(ti + 1) * in_dim];
                    let bias_term: f32 = biases.iter().zip(&xsum[ti * g..(ti + 1) * g]).map(|(b, s)| b * s).sum();
                    *acc = scaled_group_dot(x, q, scales, gs) + bias_term;
                }
            },
        );
        // Transpose [out, T] → [T, out].
        let mut out = vec![0f32; t * self.out_dim];
        for o in 0..self.out_dim {
            for ti in 0..t {
                out[ti * self.out_dim + o] = out_t[o * t + ti];
            }
        }
        out
    }

    /// Tiles of dequantized rows multiplied with gemm.
    fn matmul_tiled(&self, x: &Tensor, device: &Device) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.out_dim.div_ceil(PREFILL_TILE_ROWS));
        let mut start = 0;
        while start < self.out_dim {
            let n = PREFILL_TILE_ROWS.min(self.out_dim - start);
            let mut tile = vec![0f32; n * self.in_dim];
            tile.par_chunks_mut(self.in_dim)
                .enumerate()
                .for_each(|(r, row)| self.dequantize_row(start + r, row));
            let tile = Tensor::from_vec(tile, (n, self.in_dim), device)?;
            parts.push(x.matmul(&tile.t()?)?);
            start += n;
        }
        Tensor::cat(&parts, 1)
    }
}

/// Unpacks `PER_WORD` values of `BITS` bits from each word (widths that divide 32).
fn unpack_fixed<const BITS: u32, const PER_WORD: usize>(words: &[u32], q: &mut [f32]) {
    let mask = (1u32 << BITS) - 1;
    for (chunk, &w) in q.chunks_exact_mut(PER_WORD).zip(words) {
        let chunk: &mut [f32; PER_WORD] = chunk.try_into().expect("chunks_exact yields PER_WORD");
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = ((w >> (BITS * j as u32)) & mask) as f32;
        }
    }
}

/// Lanes of the dot product: independent partial sums let the compiler use SIMD (a single
/// running f32 sum must stay sequential).
const DOT_LANES: usize = 16;

/// `Σ_k scales[k] · (a_k · b_k)` over groups of `group_size`, keeping `DOT_LANES` partial sums
/// across groups so only one horizontal sum is paid per row (a per-group sum costs more than
/// the group's multiply-adds). Falls back to per-group `dot` when groups are not lane-aligned.
fn scaled_group_dot(a: &[f32], b: &[f32], scales: &[f32], group_size: usize) -> f32 {
    if !group_size.is_multiple_of(DOT_LANES) {
        return a
            .chunks_exact(group_size)
            .zip(b.chunks_exact(group_size))
            .zip(scales)
            .map(|((ga, gb), s)| s * dot(ga, gb))
            .sum();
    }
    let mut total = [0f32; DOT_LANES];
    for ((ga, gb), &s) in a.chunks_exact(group_size).zip(b.chunks_exact(group_size)).zip(scales) {
        let mut part = [0f32; DOT_LANES];
        for (ca, cb) in ga.chunks_exact(DOT_LANES).zip(gb.chunks_exact(DOT_LANES)) {
            let (ca, cb): (&[f32; DOT_LANES], &[f32; DOT_LANES]) = (
                ca.try_into().expect("chunks_exact yields DOT_LANES"),
                cb.try_into().expect("chunks_exact yields DOT_LANES"),
            );
            for i in 0..DOT_LANES {
                part[i] += ca[i] * cb[i];
            }
        }
        for i in 0..DOT_LANES {
            total[i] += s * part[i];
        }
    }
    total.iter().sum()
}

/// `Σ a·b` with `DOT_LANES` partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        // Fixed-size views: no bounds checks, so the loop becomes straight SIMD.
        let (ca, cb): (&[f32; DOT_LANES], &[f32; DOT_LANES]) = (
            ca.try_into().expect("chunks_exact yields DOT_LANES"),
            cb.try_into().expect("chunks_exact yields DOT_LANES"),
        );
        for i in 0..DOT_LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `values` (< 2^bits) as MLX does: a little-endian bit stream per row.
    fn pack(values: &[u32], bits: usize) -> Vec<u32> {
        let mut words = vec![0u32; values.len() * bits / 32];
        for (i, &v) in values.iter().enumerate() {
            for b in 0..bits {
                if v >> b & 1 == 1 {
                    let bit = i * bits + b;
                    words[bit / 32] |= 1 << (bit % 32);
                }
            }
        }
        words
    }

    fn weights(bits: usize, rows: usize, cols: usize, group: usize) -> (MlxWeights, Vec<f32>) {
        let levels = 1u32 << bits;
        let q: Vec<u32> = (0..rows * cols).map(|i| (i as u32 * 7 + 3) % levels).collect();
        let groups = cols / group;
        let scales: Vec<f32> = (0..rows * groups).map(|i| 0.01 * (1 + i % 5) as f32).collect();
        let biases: Vec<f32> = (0..rows * groups).map(|i| -0.02 * (i % 3) as f32).collect();
        let packed = q.chunks(cols).flat_map(|r| pack(r, bits)).collect();
        let dense = (0..rows * cols)
            .map(|i| {
                let (o, c) = (i / cols, i % cols);
                scales[o * groups + c / group] * q[i] as f32 + biases[o * groups + c / group]
            })
            .collect();
        let w = MlxWeights {
            packed,
            scales,
            biases,
            out_dim: rows,
            in_dim: cols,
            bits,
            group_size: group,
        };
        (w, dense)
    }

    #[test]
    fn every_bit_width_and_group_size_dequantizes_exactly() {
        for bits in [2, 3, 4, 5, 6, 8] {
            for group in [32, 64, 128] {
                let (w, dense) = weights(bits, 3, 256, group);
                let mut row = vec![0f32; 256];
                for o in 0..3 {
                    w.dequantize_row(o, &mut row);
                    assert_eq!(
                        row,
                        dense[o * 256..(o + 1) * 256],
                        "{bits} bits, group {group}, row {o}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_match_for_every_group_size() -> Result<()> {
        for group in [32, 64, 128] {
            let (w, dense) = weights(4, 20, 256, group);
            let dense = Tensor::from_vec(dense, (20, 256), &Device::Cpu)?;
            let x = Tensor::arange(0f32, 512.0, &Device::Cpu)?
                .reshape((2, 256))?
                .affine(0.003, -0.5)?;
            let diff = (x.matmul(&dense.t()?)? - w.matmul(&x)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-3, "group {group}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn both_matmul_paths_match_the_dense_product() -> Result<()> {
        let (w, dense) = weights(4, 300, 64, 32);
        let dense = Tensor::from_vec(dense, (300, 64), &Device::Cpu)?;
        for t in [1, 3, 40] {
            let x = Tensor::arange(0f32, (t * 64) as f32, &Device::Cpu)?
                .reshape((t, 64))?
                .affine(0.01, -0.3)?;
            let want = x.matmul(&dense.t()?)?;
            let got = w.matmul(&x)?;
            let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "T={t}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn split_rows_keep_their_groups() {
        let (w, dense) = weights(3, 6, 64, 64);
        let part = w.rows(2, 3);
        let mut row = vec![0f32; 64];
        part.dequantize_row(1, &mut row);
        assert_eq!(row, dense[3 * 64..4 * 64]);
    }
}
