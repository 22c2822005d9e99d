//! The CPU's own compute. Quantized and f16 weights are kept packed in memory: every block
//! format is repacked into one layout (`packed`) and f16 into another (`half`), both multiplied
//! by the weight-stationary kernels of `kernels` (`HostMatrix::matmul`), and f32 weights in
//! the same panels (`single`). `formats::mlx` and
//! `formats::ggml` decode the file formats into them. `host_ops` holds the f32 element-wise
//! passes (SiLU·up, the vectorizable exp attention shares).

pub mod half;
pub mod host_ops;
pub mod kernels;
pub mod packed;
pub mod single;

use candle_core::{DType, Result, Tensor};

use half::HalfMatrix;
use packed::PackedMatrix;
use single::SingleMatrix;

/// A weight matrix in one of the CPU kernels' layouts.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// Block-quantized levels (GGUF blocks, MLX affine).
    Blocks(PackedMatrix),
    /// f16 values (GGUF F16, dense bf16/f16 checkpoints).
    Half(HalfMatrix),
    /// f32 values (f32 checkpoints).
    Single(SingleMatrix),
}

impl HostMatrix {
    /// A dense `[rows, cols]` f32 CPU matrix as f16 panels, when f16 holds its values
    /// (`HalfMatrix::from_f32_if_exact`: bf16 and f16 checkpoints), otherwise as f32 panels
    /// (f32 checkpoints: the f32 kernel beats candle's gemm 1.7× at one row, 2-3× at 8 and 512);
    /// None for other devices and dtypes.
    pub fn from_dense(weight: &Tensor) -> Result<Option<Self>> {
        if !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            return Ok(None);
        }
        let (rows, cols) = weight.dims2()?;
        let values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        if let Some(half) = HalfMatrix::from_f32_if_exact(&values, rows, cols)? {
            return Ok(Some(Self::Half(half)));
        }
        Ok(Some(Self::Single(SingleMatrix::from_row_major(&values, rows, cols)?)))
    }

    /// `x · Wᵀ` for `x` of shape `[T, cols]`; returns `[T, rows]` in x's dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (t, cols) = x.dims2()?;
        if cols != self.in_dim() {
            candle_core::bail!("CPU matmul: input has {cols} columns, weights expect {}", self.in_dim());
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (out, rows) = match self {
            Self::Blocks(m) => (kernels::product(m, &xs, t), m.out_dim()),
            Self::Half(m) => (kernels::half_product(m, &xs, t), m.out_dim()),
            Self::Single(m) => (kernels::single_product(m, &xs, t), m.out_dim()),
        };
        Tensor::from_vec(out, (t, rows), x.device())?.to_dtype(x.dtype())
    }

    /// Input columns.
    pub fn in_dim(&self) -> usize {
        match self {
            Self::Blocks(m) => m.in_dim(),
            Self::Half(m) => m.cols,
            Self::Single(m) => m.in_dim(),
        }
    }

    /// Rows `ids` as weights, `[ids.len(), cols]` row-major (embedding lookups).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (rows, cols) = match self {
            Self::Blocks(m) => (m.out_dim(), m.in_dim()),
            Self::Half(m) => (m.out_dim(), m.cols),
            Self::Single(m) => (m.out_dim(), m.in_dim()),
        };
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= rows) {
            candle_core::bail!("row {bad} of a {rows}-row matrix");
        }
        let mut out = vec![0f32; ids.len() * cols];
        for (row, &id) in out.chunks_mut(cols.max(1)).zip(ids) {
            match self {
                Self::Blocks(m) => m.dequantize_row(id as usize, row),
                Self::Half(m) => m.dequantize_row(id as usize, row),
                Self::Single(m) => m.dequantize_row(id as usize, row),
            }
        }
        Ok(out)
    }

    /// The rows of `parts` one after the other, or None unless they are all block-quantized
    /// alike (`PackedMatrix::stack`), all f16 alike (`HalfMatrix::stack`) or all f32
    /// (`SingleMatrix::stack`).
    pub fn stack(parts: &[&Self]) -> Result<Option<Self>> {
        if let Some(blocks) = parts.iter().map(|p| p.as_blocks()).collect::<Option<Vec<_>>>() {
            return Ok(PackedMatrix::stack(&blocks)?.map(Self::Blocks));
        }
        let halves = parts.iter().map(|p| p.as_half()).collect::<Option<Vec<_>>>();
        if let Some(halves) = halves {
            return Ok(HalfMatrix::stack(&halves).map(Self::Half));
        }
        let singles = parts.iter().map(|p| p.as_single()).collect::<Option<Vec<_>>>();
        Ok(singles.and_then(|s| SingleMatrix::stack(&s)).map(Self::Single))
    }

    /// The block-quantized matrix, unless this is an f16 or f32 one.
    pub fn as_blocks(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Blocks(m) => Some(m),
            _ => None,
        }
    }

    fn as_half(&self) -> Option<&HalfMatrix> {
        match self {
            Self::Half(m) => Some(m),
            _ => None,
        }
    }

    fn as_single(&self) -> Option<&SingleMatrix> {
        match self {
            Self::Single(m) => Some(m),
            _ => None,
        }
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Result<Self> {
        Ok(match self {
            Self::Blocks(m) => Self::Blocks(m.rows(start, n)?),
            Self::Half(m) => Self::Half(m.rows(start, n)?),
            Self::Single(m) => Self::Single(m.rows(start, n)?),
        })
    }
}
