//! MLX quantization (`mlx_lm.convert -q`). Affine (the default mode): per row, groups of
//! `group_size` values `w = scale · q + bias` with `q` packed `bits` at a time into
//! little-endian u32 words. `--q-mode mxfp4`: the same words hold 4-bit E2M1 codes, with one
//! E8M0 scale byte per 32 values and no biases (`formats::mxfp4`).
//!
//! This is the file form: loaded as stored, dequantized whole for a GPU, or repacked into the
//! CPU kernels' layout (`packed`), where levels of up to 4 bits stay two per byte and wider
//! ones take a byte each.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::mxfp4::Mxfp4Matrix;
use crate::compute::cpu::packed::{PackSpec, PackedMatrix};

/// One MLX-quantized matrix `[out_dim, in_dim]` as stored: affine or MXFP4.
#[derive(Debug, Clone)]
pub enum MlxMatrix {
    /// `weight` with `scales` and `biases`.
    Affine(MlxWeights),
    /// `weight` with E8M0 `scales` (`mode: mxfp4`).
    Mxfp4(Mxfp4Matrix),
}

impl MlxMatrix {
    /// True when `vb` holds an MLX-quantized module (`weight` and `scales`).
    pub fn present(vb: &VarBuilder) -> bool {
        vb.contains_tensor("weight") && vb.contains_tensor("scales")
    }

    /// Loads the module under `vb`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let mut one = Self::read(vb, None, in_dim, out_dim)?;
        Ok(one.remove(0))
    }

    /// The `experts` matrices `[out_dim, in_dim]` that mlx-lm stacks into one `[experts, out,
    /// in]` module (`switch_mlp.gate_proj`), read once and split.
    pub fn load_stacked(vb: &VarBuilder, experts: usize, in_dim: usize, out_dim: usize) -> Result<Vec<Self>> {
        Self::read(vb, Some(experts), in_dim, out_dim)
    }

    fn read(vb: &VarBuilder, stacked: Option<usize>, in_dim: usize, out_dim: usize) -> Result<Vec<Self>> {
        if vb.contains_tensor("biases") {
            return Ok(MlxWeights::read(vb, stacked, in_dim, out_dim)?
                .into_iter()
                .map(Self::Affine)
                .collect());
        }
        let count = stacked.unwrap_or(1);
        let words = vb.get_unchecked_dtype("weight", DType::U32)?;
        let scales = vb.get_unchecked_dtype("scales", DType::U8)?;
        let lead: &[usize] = if stacked.is_some() { &[count] } else { &[] };
        let shape_of = |last: usize| [lead, &[out_dim, last]].concat();
        if !in_dim.is_multiple_of(32) || words.dims() != shape_of(in_dim / 8) || scales.dims() != shape_of(in_dim / 32)
        {
            candle_core::bail!(
                "{}: a quantized module without biases must be MXFP4 (4-bit codes, a scale byte per 32): \
                 shapes {:?}/{:?} do not fit {count} [{out_dim}, {in_dim}] matrices",
                vb.prefix(),
                words.shape(),
                scales.shape()
            );
        }
        let words: Vec<u32> = words.flatten_all()?.to_vec1()?;
        let scales: Vec<u8> = scales.flatten_all()?.to_vec1()?;
        let (code_bytes, scale_bytes) = (out_dim * in_dim / 2, out_dim * in_dim / 32);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        (0..count)
            .map(|e| {
                Mxfp4Matrix::from_pairs(
                    bytes[e * code_bytes..(e + 1) * code_bytes].to_vec(),
                    scales[e * scale_bytes..(e + 1) * scale_bytes].to_vec(),
                    out_dim,
                    in_dim,
                )
                .map(Self::Mxfp4)
            })
            .collect()
    }

    /// The matrix in the CPU kernels' layout.
    pub fn packed(&self) -> Result<PackedMatrix> {
        match self {
            Self::Affine(m) => m.packed(),
            Self::Mxfp4(m) => m.packed(),
        }
    }

    /// The whole `[out, in]` matrix, on `device` in `dtype`.
    pub fn dequantized(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Affine(m) => m.dequantized(device, dtype),
            Self::Mxfp4(m) => m.dequantized(device, dtype),
        }
    }
}

/// A tensor's values on the host; the tensor itself is dropped on return.
fn host_values<T: candle_core::WithDType>(t: Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1()
}

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
    /// `weight` (u32), `scales` and `biases` under `vb`: one matrix (`stacked` None, 2-D
    /// tensors) or `stacked` of them (3-D tensors); bits and group size follow from the shapes,
    /// as mlx-lm infers them.
    fn read(vb: &VarBuilder, stacked: Option<usize>, in_dim: usize, out_dim: usize) -> Result<Vec<Self>> {
        let packed = vb.get_unchecked_dtype("weight", DType::U32)?;
        let scales = vb.get_unchecked_dtype("scales", DType::F32)?;
        let biases = vb.get_unchecked_dtype("biases", DType::F32)?;
        let count = stacked.unwrap_or(1);
        let lead: &[usize] = if stacked.is_some() { &[count] } else { &[] };
        let shape_of = |last: usize| [lead, &[out_dim, last]].concat();
        let words = packed.dims().last().copied().unwrap_or(0);
        let groups = scales.dims().last().copied().unwrap_or(0);
        if packed.dims() != shape_of(words)
            || scales.dims() != shape_of(groups)
            || biases.dims() != shape_of(groups)
            || groups == 0
        {
            candle_core::bail!(
                "{}: quantized shapes {:?}/{:?}/{:?} do not fit {count} [{out_dim}, {in_dim}] matrices",
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
        // Each tensor is freed as soon as its values are read, and one matrix keeps them without
        // another copy: a large table (Gemma 4's per-layer embeddings, 1.2 GB at 4 bits) would
        // otherwise be held three times over at once while loading.
        let (packed, scales, biases) = (host_values::<u32>(packed)?, host_values(scales)?, host_values(biases)?);
        let matrix = |packed, scales, biases| Self {
            packed,
            scales,
            biases,
            out_dim,
            in_dim,
            bits,
            group_size,
        };
        if count == 1 {
            return Ok(vec![matrix(packed, scales, biases)]);
        }
        let (pw, gw) = (out_dim * words, out_dim * groups);
        Ok((0..count)
            .map(|e| {
                matrix(
                    packed[e * pw..(e + 1) * pw].to_vec(),
                    scales[e * gw..(e + 1) * gw].to_vec(),
                    biases[e * gw..(e + 1) * gw].to_vec(),
                )
            })
            .collect())
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

    /// The whole `[out, in]` matrix, on `device` in `dtype`.
    pub fn dequantized(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let rows: Vec<u32> = (0..self.out_dim as u32).collect();
        let values = self.dequantize_rows(&rows);
        Tensor::from_vec(values, (self.out_dim, self.in_dim), device)?.to_dtype(dtype)
    }

    /// The matrix in the CPU kernels' layout.
    pub fn packed(&self) -> Result<PackedMatrix> {
        let spec = PackSpec {
            four_bit: self.bits <= 4,
            group: self.group_size,
            zero_point: None,
            codebook: None,
        };
        let g = self.groups_per_row();
        PackedMatrix::from_rows(self.out_dim, self.in_dim, spec, |o, levels| {
            let mut q = vec![0f32; self.in_dim];
            self.unpack_row(o, &mut q);
            levels.q.extend(q.iter().map(|&v| v as u8));
            levels.scales.extend_from_slice(&self.scales[o * g..(o + 1) * g]);
            levels.mins.extend_from_slice(&self.biases[o * g..(o + 1) * g]);
        })
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
    fn repacking_keeps_every_weight() {
        for bits in [2, 3, 4, 5, 6, 8] {
            for group in [32, 64, 128] {
                let (w, dense) = weights(bits, 3, 256, group);
                let packed = w.packed().expect("packs");
                let mut row = vec![0f32; 256];
                for o in 0..3 {
                    packed.dequantize_row(o, &mut row);
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
    fn split_rows_keep_their_groups() {
        let (w, dense) = weights(3, 6, 64, 64);
        let part = w.packed().expect("packs").rows(2, 3).expect("splits");
        let mut row = vec![0f32; 64];
        part.dequantize_row(1, &mut row);
        assert_eq!(row, dense[3 * 64..4 * 64]);
    }
}
