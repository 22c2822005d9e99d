//! GGUF (ggml) block formats decoded into unsigned levels with affine group parameters
//! (`w = scale · q + min`), the one form the CPU kernels multiply. Each decoder reads one
//! matrix row of raw blocks; the layouts are ggml's (`ggml-quants.c`, `dequantize_row_*`).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

use crate::compute::cpu::half::HalfMatrix;
use crate::compute::cpu::packed::{Levels, PackSpec, PackedMatrix};
use crate::compute::cpu::HostMatrix;

/// How a ggml type decodes: values and bytes per block, and the packed form of its levels.
#[derive(Clone, Copy, Debug)]
struct BlockFormat {
    block_values: usize,
    block_bytes: usize,
    spec: PackSpec,
}

/// The decoding of `dtype`, or None for types the packed kernels do not take (they stay
/// with candle's quantized matmul).
fn format(dtype: GgmlDType) -> Option<BlockFormat> {
    let f = |block_values, block_bytes, group, four_bit, zero_point| BlockFormat {
        block_values,
        block_bytes,
        spec: PackSpec {
            four_bit,
            group,
            zero_point,
            codebook: None,
        },
    };
    Some(match dtype {
        GgmlDType::Q4_0 => f(32, 18, 32, true, Some(8)),
        GgmlDType::Q4_1 => f(32, 20, 32, true, None),
        GgmlDType::Q5_0 => f(32, 22, 32, false, Some(16)),
        GgmlDType::Q5_1 => f(32, 24, 32, false, None),
        GgmlDType::Q8_0 => f(32, 34, 32, false, Some(128)),
        GgmlDType::Q4K => f(256, 144, 32, true, None),
        GgmlDType::Q5K => f(256, 176, 32, false, None),
        GgmlDType::Q6K => f(256, 210, 16, false, Some(32)),
        _ => return None,
    })
}

/// A GGUF tensor in a CPU kernels' layout, or None for types left to candle (Q2_K, Q3_K, F32,
/// …).
pub fn host_matrix(q: &QTensor) -> Result<Option<HostMatrix>> {
    if q.dtype() == GgmlDType::F16 {
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data()?;
        let values: Vec<f16> = data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        return Ok(Some(HostMatrix::Half(HalfMatrix::from_row_major(&values, rows, cols)?)));
    }
    Ok(pack(q)?.map(HostMatrix::Blocks))
}

/// `q` (a `[rows, cols]` matrix of ggml blocks) repacked for the CPU kernels, or None for
/// types they do not take.
pub fn pack(q: &QTensor) -> Result<Option<PackedMatrix>> {
    let dtype = q.dtype();
    let Some(fmt) = format(dtype) else {
        return Ok(None);
    };
    let (rows, cols) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = cols / fmt.block_values * fmt.block_bytes;
    if data.len() != rows * row_bytes {
        candle_core::bail!("{dtype:?} matrix [{rows}, {cols}] has {} bytes", data.len());
    }
    PackedMatrix::from_rows(rows, cols, fmt.spec, |o, levels| {
        decode_row(dtype, fmt, &data[o * row_bytes..(o + 1) * row_bytes], levels)
    })
    .map(Some)
}

/// Decodes one row of `dtype` blocks into `out` (levels for every value, one scale per
/// group, one min per group for types that store them).
fn decode_row(dtype: GgmlDType, fmt: BlockFormat, bytes: &[u8], out: &mut Levels) {
    for block in bytes.chunks_exact(fmt.block_bytes) {
        match dtype {
            GgmlDType::Q4_0 => q4_0(block, out),
            GgmlDType::Q4_1 => q4_1(block, out),
            GgmlDType::Q5_0 => q5_0(block, out),
            GgmlDType::Q5_1 => q5_1(block, out),
            GgmlDType::Q8_0 => q8_0(block, out),
            GgmlDType::Q4K => q4_k(block, out),
            GgmlDType::Q5K => q5_k(block, out),
            GgmlDType::Q6K => q6_k(block, out),
            _ => unreachable!("format() admitted only the types above"),
        }
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Nibbles of 16 bytes: value j in the low half of byte j, value j + 16 in the high half.
fn push_nibbles(qs: &[u8], high_bits: Option<u32>, out: &mut Levels) {
    let high = |j: usize| high_bits.map_or(0, |h| (((h >> j) & 1) << 4) as u8);
    out.q.extend(qs.iter().enumerate().map(|(j, &b)| (b & 0x0F) | high(j)));
    out.q
        .extend(qs.iter().enumerate().map(|(j, &b)| (b >> 4) | high(j + 16)));
}

fn q4_0(b: &[u8], out: &mut Levels) {
    out.scales.push(half_at(b, 0));
    push_nibbles(&b[2..18], None, out);
}

fn q4_1(b: &[u8], out: &mut Levels) {
    out.scales.push(half_at(b, 0));
    out.mins.push(half_at(b, 2));
    push_nibbles(&b[4..20], None, out);
}

fn q5_0(b: &[u8], out: &mut Levels) {
    out.scales.push(half_at(b, 0));
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    push_nibbles(&b[6..22], Some(qh), out);
}

fn q5_1(b: &[u8], out: &mut Levels) {
    out.scales.push(half_at(b, 0));
    out.mins.push(half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    push_nibbles(&b[8..24], Some(qh), out);
}

fn q8_0(b: &[u8], out: &mut Levels) {
    out.scales.push(half_at(b, 0));
    // Signed int8 shifted to unsigned levels: w = d · (u - 128).
    out.q.extend(b[2..34].iter().map(|&v| (v as i8 as i16 + 128) as u8));
}

/// Scale and min of sub-block `j` from the 12 packed 6-bit values of a K-quant super-block.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K and Q5_K: eight sub-blocks of 32, each `d·sc·q - dmin·m`; `qh` adds the fifth bit.
fn k_quant_4_5(b: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut Levels) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    for chunk in 0..4 {
        let q = &qs[32 * chunk..32 * chunk + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * chunk + half, scales);
            out.scales.push(d * sc);
            out.mins.push(-dmin * m);
            let bit = 1u8 << (2 * chunk + half);
            out.q.extend(q.iter().enumerate().map(|(l, &v)| {
                let high = qh.map_or(0, |h| if h[l] & bit != 0 { 16 } else { 0 });
                ((v >> shift) & 0x0F) + high
            }));
        }
    }
}

fn q4_k(b: &[u8], out: &mut Levels) {
    k_quant_4_5(b, None, &b[16..144], out);
}

fn q5_k(b: &[u8], out: &mut Levels) {
    k_quant_4_5(b, Some(&b[16..48]), &b[48..176], out);
}

/// Q6_K: sixteen groups of 16 with int8 scales, levels 0..63 around 32.
fn q6_k(b: &[u8], out: &mut Levels) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    let mut values = [0u8; 256];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
        let y = &mut values[128 * n..128 * n + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    out.q.extend_from_slice(&values);
    // sc[g] scales values 16g .. 16g + 15, in order.
    out.scales.extend(sc.iter().map(|&s| d * s as i8 as f32));
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn every_supported_type_repacks_to_candles_dequantized_values() -> Result<()> {
        let (rows, cols) = (7, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.45) * if i % 61 == 0 { 3.0 } else { 0.2 })
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&dense, dtype)?;
            let want: Vec<Vec<f32>> = q.dequantize(&Device::Cpu)?.to_vec2()?;
            let packed = pack(&q)?.expect("supported");
            let mut row = vec![0f32; cols];
            for (o, want) in want.iter().enumerate() {
                packed.dequantize_row(o, &mut row);
                for (k, (g, w)) in row.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                        "{dtype:?} [{o}, {k}]: {g} vs {w}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn other_types_are_left_to_candle() -> Result<()> {
        let dense = Tensor::zeros((2, 256), candle_core::DType::F32, &Device::Cpu)?;
        assert!(pack(&QTensor::quantize(&dense, GgmlDType::Q2K)?)?.is_none());
        Ok(())
    }
}
