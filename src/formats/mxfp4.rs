//! MXFP4 (OCP microscaling FP4), the format gpt-oss ships its experts in: blocks of 32 E2M1
//! values (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) sharing one E8M0 scale 2^(e−127). Files lay it out
//! two ways:
//! - GGUF (ggml type 39): 17-byte blocks, the scale byte first, then 16 bytes whose low nibbles
//!   are values 0..16 and high nibbles values 16..32 (`dequantize_row_mxfp4`);
//! - Hugging Face's `<name>_blocks` `[…, rows, cols/32, 16]` with `<name>_scales` `[…, rows,
//!   cols/32]`, and mlx-lm's `mode: mxfp4` (the same bytes as u32 words): byte i holds values
//!   2i (low nibble) and 2i + 1 (high).
//!
//! On the CPU the codes stay 4-bit in the kernels' layout with a codebook of levels
//! `2·E2M1 + 12` (zero point 12, scale 2^(e−128), as llama.cpp's doubled `kvalues_mxfp4`); a
//! GPU gets the matrix dequantized once.

use candle_core::{DType, Device, Result, Tensor};

use crate::compute::cpu::packed::{PackSpec, PackedMatrix};

/// Values per block (one scale each).
const BLOCK: usize = 32;
/// Twice each E2M1 code's value (llama.cpp's `kvalues_mxfp4`).
const DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// The CPU kernels' form: 4-bit codes, levels `DOUBLED + 12`, a scale per block of 32.
pub const SPEC: PackSpec = PackSpec {
    four_bit: true,
    group: BLOCK,
    zero_point: Some(12),
    codebook: Some([12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0]),
};

/// Where a file puts a block's codes and scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// GGUF: per block, the scale byte then 16 bytes (values j and j + 16 in byte j).
    Gguf,
    /// Hugging Face and MLX: per row, 16 bytes per block (values 2i and 2i + 1 in byte i), and
    /// the scales apart.
    Pairs,
}

/// One `[rows, cols]` MXFP4 matrix as its file stores it.
#[derive(Clone, Debug)]
pub struct Mxfp4Matrix {
    rows: usize,
    cols: usize,
    layout: Layout,
    /// GGUF: the blocks, row after row. Pairs: the code bytes, row after row.
    data: Vec<u8>,
    /// Pairs: one scale byte per row and block (empty for GGUF).
    scales: Vec<u8>,
}

impl Mxfp4Matrix {
    /// A GGUF tensor's bytes (`rows · cols/32` blocks of 17 bytes).
    pub fn from_gguf(data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        Self::checked(rows, cols, Layout::Gguf, data, Vec::new())
    }

    /// Hugging Face `_blocks` bytes (`rows · cols/2`) and `_scales` bytes (`rows · cols/32`),
    /// or mlx-lm's `weight` words and `scales`, as bytes.
    pub fn from_pairs(blocks: Vec<u8>, scales: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        Self::checked(rows, cols, Layout::Pairs, blocks, scales)
    }

    fn checked(rows: usize, cols: usize, layout: Layout, data: Vec<u8>, scales: Vec<u8>) -> Result<Self> {
        let blocks = rows * cols / BLOCK;
        let fits = match layout {
            Layout::Gguf => data.len() == blocks * 17 && scales.is_empty(),
            Layout::Pairs => data.len() == blocks * 16 && scales.len() == blocks,
        };
        if !cols.is_multiple_of(BLOCK) || !fits {
            candle_core::bail!(
                "MXFP4 [{rows}, {cols}]: {} code bytes and {} scales do not fit it",
                data.len(),
                scales.len()
            );
        }
        Ok(Self {
            rows,
            cols,
            layout,
            data,
            scales,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `first, first + step, …` as their own matrix (gpt-oss interleaves its gate and up
    /// projections row by row).
    pub fn every_nth_row(&self, first: usize, step: usize) -> Result<Self> {
        let picked: Vec<usize> = (first..self.rows).step_by(step.max(1)).collect();
        let (row_bytes, row_scales) = match self.layout {
            Layout::Gguf => (self.cols / BLOCK * 17, 0),
            Layout::Pairs => (self.cols / 2, self.cols / BLOCK),
        };
        let data = picked
            .iter()
            .flat_map(|&o| &self.data[o * row_bytes..(o + 1) * row_bytes])
            .copied()
            .collect();
        let scales = picked
            .iter()
            .flat_map(|&o| &self.scales[o * row_scales..(o + 1) * row_scales])
            .copied()
            .collect();
        Self::checked(picked.len(), self.cols, self.layout, data, scales)
    }

    /// Block `b` of row `o`: its 32 codes in order and its scale byte.
    fn block(&self, o: usize, b: usize, codes: &mut [u8; BLOCK]) -> u8 {
        let index = o * (self.cols / BLOCK) + b;
        match self.layout {
            Layout::Gguf => {
                let block = &self.data[index * 17..(index + 1) * 17];
                for (j, &byte) in block[1..].iter().enumerate() {
                    codes[j] = byte & 0x0F;
                    codes[j + 16] = byte >> 4;
                }
                block[0]
            }
            Layout::Pairs => {
                for (i, &byte) in self.data[index * 16..(index + 1) * 16].iter().enumerate() {
                    codes[2 * i] = byte & 0x0F;
                    codes[2 * i + 1] = byte >> 4;
                }
                self.scales[index]
            }
        }
    }

    /// The matrix in the CPU kernels' layout, codes kept.
    pub fn packed(&self) -> Result<PackedMatrix> {
        PackedMatrix::from_rows(self.rows, self.cols, SPEC, |o, levels| {
            let mut codes = [0u8; BLOCK];
            for b in 0..self.cols / BLOCK {
                let e = self.block(o, b, &mut codes);
                levels.q.extend_from_slice(&codes);
                levels.scales.push(half_scale(e));
            }
        })
    }

    /// The weights `[rows, cols]` on `device` in `dtype`.
    pub fn dequantized(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let mut values = Vec::with_capacity(self.rows * self.cols);
        let mut codes = [0u8; BLOCK];
        for o in 0..self.rows {
            for b in 0..self.cols / BLOCK {
                let d = half_scale(self.block(o, b, &mut codes));
                values.extend(codes.iter().map(|&c| f32::from(DOUBLED[usize::from(c)]) * d));
            }
        }
        Tensor::from_vec(values, (self.rows, self.cols), device)?.to_dtype(dtype)
    }
}

/// 2^(e−128): half the E8M0 scale, since the codebook doubles E2M1 values. Built from its bits
/// (e = 0 and 1 are subnormal), as ggml's `GGML_E8M0_TO_FP32_HALF`.
fn half_scale(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_scales_are_powers_of_two() {
        assert_eq!(half_scale(128), 1.0);
        assert_eq!(half_scale(127), 0.5);
        assert_eq!(half_scale(130), 4.0);
        assert_eq!(half_scale(1), 2f64.powi(-127) as f32);
        assert_eq!(half_scale(0), 2f64.powi(-128) as f32);
        assert!(half_scale(0) > 0.0);
        assert_eq!(half_scale(255), 2f32.powi(127));
    }

    /// The dequantized weights, row after row.
    fn values(m: &Mxfp4Matrix) -> Vec<f32> {
        let t = m.dequantized(&Device::Cpu, DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The same values in both layouts give the same weights, through the packed layout too.
    #[test]
    fn both_layouts_and_the_packed_form_agree() {
        let (rows, cols) = (3, 64);
        let code = |o: usize, k: usize| ((o * 7 + k * 5 + k / 3) % 16) as u8;
        let scale = |o: usize, b: usize| (120 + o * 2 + b) as u8;
        let (mut gguf, mut pairs, mut scales) = (Vec::new(), Vec::new(), Vec::new());
        for o in 0..rows {
            for b in 0..cols / BLOCK {
                gguf.push(scale(o, b));
                gguf.extend((0..16).map(|j| code(o, b * 32 + j) | code(o, b * 32 + j + 16) << 4));
                pairs.extend((0..16).map(|i| code(o, b * 32 + 2 * i) | code(o, b * 32 + 2 * i + 1) << 4));
                scales.push(scale(o, b));
            }
        }
        let a = Mxfp4Matrix::from_gguf(gguf, rows, cols).unwrap();
        let b = Mxfp4Matrix::from_pairs(pairs, scales, rows, cols).unwrap();
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (o, k) = (i / cols, i % cols);
                let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][usize::from(code(o, k) % 8)];
                let sign = if code(o, k) >= 8 { -1.0 } else { 1.0 };
                sign * e2m1 * 2f32.powi(scale(o, k / BLOCK) as i32 - 127)
            })
            .collect();
        for m in [&a, &b] {
            assert_eq!(values(m), want, "{:?}", m.layout);
            let packed = m.packed().unwrap();
            let mut row = vec![0f32; cols];
            for o in 0..rows {
                packed.dequantize_row(o, &mut row);
                assert_eq!(row, want[o * cols..(o + 1) * cols], "{:?} packed row {o}", m.layout);
            }
        }
        assert_eq!(values(&b.every_nth_row(1, 2).unwrap()), want[cols..2 * cols]);
    }

    #[test]
    fn sizes_that_do_not_fit_are_errors() {
        assert!(Mxfp4Matrix::from_gguf(vec![0; 16], 1, 32).is_err());
        assert!(Mxfp4Matrix::from_pairs(vec![0; 16], vec![], 1, 32).is_err());
        assert!(Mxfp4Matrix::from_pairs(vec![0; 16], vec![0], 1, 30).is_err());
    }
}
