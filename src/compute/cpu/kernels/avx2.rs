//! 256-bit kernels for x86-64 CPUs without AVX-512 (most laptops and desktops): the AVX-512
//! kernel's panels read as two halves of 8 weight rows, one 256-bit register each, so lanes are
//! still output rows and integer sums need no horizontal reduction. The integer dot of 4 levels
//! is `vpdpbusd` where the CPU has AVX-VNNI; with plain AVX2 it is `vpmaddubsw` + `vpmaddwd`,
//! which cannot saturate for levels below 128 (4-bit levels, codebooks' levels: 2 · 127 · 127
//! < 2¹⁵); 8-bit levels are split into nibbles first. The f16 kernel widens 16 rows per column
//! with F16C into two registers.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{check_units, Activations, Output};
use crate::compute::cpu::half::HalfMatrix;
use crate::compute::cpu::packed::{PackedMatrix, Params, PANEL};

/// Weight rows per 256-bit register (half a panel).
const HALF: usize = PANEL / 2;
/// Activation rows per int8 tile: 8 integer accumulators (4 rows × 2 halves), 4 weight
/// registers and 2 broadcasts fit the 16 registers.
const TILE_ACTS: usize = 4;
/// Activation rows per f16 tile: 12 accumulators, 2 weight registers, 1 broadcast.
const HALF_TILE_ACTS: usize = 6;
/// Activation rows per cache chunk (as in the AVX-512 kernel).
const CHUNK_ACTS: usize = 128;
/// Bytes ahead of the current position in an int8 panel that are prefetched (as in the
/// AVX-512 kernel).
const PREFETCH: usize = 8192;
/// Values (4 KiB) ahead in an f16 panel that are prefetched (as in the AVX-512 kernel).
const HALF_PREFETCH: usize = 2048;

/// True when this CPU has AVX2, FMA and F16C (every x86-64 CPU since 2013-2015).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// True when it also has AVX-VNNI (256-bit `vpdpbusd`: Intel since Alder Lake, AMD since Zen 5).
pub(super) fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avxvnni")
}

/// Int8 products for the output columns of `panels`, every activation row; `VNNI` picks the
/// integer dot (AVX-VNNI or plain AVX2).
pub(super) fn product<const VNNI: bool>(w: &PackedMatrix, a: &Activations, panels: Range<usize>, out: &Output) {
    assert!(
        if VNNI { vnni_available() } else { available() },
        "the 256-bit kernel needs AVX2, FMA and F16C (and AVX-VNNI for its VNNI form)"
    );
    check_units(&panels, w.panels);
    // SAFETY: the instructions are present (asserted above); every load stays inside the
    // matrix's panels and the activation buffers, every store inside the output (see `tile`).
    unsafe {
        if VNNI {
            with_vnni(w, a, panels, out)
        } else {
            without_vnni(w, a, panels, out)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn with_vnni(w: &PackedMatrix, a: &Activations, panels: Range<usize>, out: &Output) {
    by_format::<true>(w, a, panels, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn without_vnni(w: &PackedMatrix, a: &Activations, panels: Range<usize>, out: &Output) {
    by_format::<false>(w, a, panels, out)
}

#[inline(always)]
unsafe fn by_format<const VNNI: bool>(w: &PackedMatrix, a: &Activations, panels: Range<usize>, out: &Output) {
    match (w.spec.four_bit, w.mins.is_some(), w.spec.codebook.is_some()) {
        (true, true, false) => chunks::<VNNI, true, true, false>(w, a, panels, out),
        (true, false, false) => chunks::<VNNI, true, false, false>(w, a, panels, out),
        (true, false, true) => chunks::<VNNI, true, false, true>(w, a, panels, out),
        (false, true, _) => chunks::<VNNI, false, true, false>(w, a, panels, out),
        (false, false, _) => chunks::<VNNI, false, false, false>(w, a, panels, out),
        (true, true, true) => unreachable!("codebook formats have a zero point"),
    }
}

#[inline(always)]
unsafe fn chunks<const VNNI: bool, const FOUR: bool, const MINS: bool, const BOOK: bool>(
    w: &PackedMatrix,
    a: &Activations,
    panels: Range<usize>,
    out: &Output,
) {
    for m0 in (0..a.rows).step_by(CHUNK_ACTS) {
        let m_end = (m0 + CHUNK_ACTS).min(a.rows);
        for p in panels.clone() {
            let mut m = m0;
            while m + TILE_ACTS <= m_end {
                tile::<VNNI, FOUR, MINS, BOOK, TILE_ACTS>(w, a, p, m, out);
                m += TILE_ACTS;
            }
            match m_end - m {
                1 => tile::<VNNI, FOUR, MINS, BOOK, 1>(w, a, p, m, out),
                2 => tile::<VNNI, FOUR, MINS, BOOK, 2>(w, a, p, m, out),
                3 => tile::<VNNI, FOUR, MINS, BOOK, 3>(w, a, p, m, out),
                _ => {}
            }
        }
    }
}

/// `acc` plus, per lane, the dot of the lane's 4 levels `w` (each below 128 unless `WIDE`:
/// 4-bit levels, or a codebook's) with the 4 activation levels broadcast in `x`.
#[inline(always)]
unsafe fn dot<const VNNI: bool, const WIDE: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    if VNNI {
        return _mm256_dpbusd_avx_epi32(acc, w, x);
    }
    let ones = _mm256_set1_epi16(1);
    if !WIDE {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
    }
    // 8-bit levels: w = 16 · high + low, each nibble's pairs below 2¹⁵.
    let low_mask = _mm256_set1_epi8(0x0F);
    let low = _mm256_and_si256(w, low_mask);
    let high = _mm256_and_si256(_mm256_srli_epi16(w, 4), low_mask);
    let low_sum = _mm256_madd_epi16(_mm256_maddubs_epi16(low, x), ones);
    let high_sum = _mm256_madd_epi16(_mm256_maddubs_epi16(high, x), _mm256_set1_epi16(16));
    _mm256_add_epi32(acc, _mm256_add_epi32(low_sum, high_sum))
}

/// Four activation levels at `q[at..at + 4]` broadcast to every lane.
#[inline(always)]
unsafe fn broadcast4(q: &[i8], at: usize) -> __m256i {
    debug_assert!(at + 4 <= q.len());
    _mm256_set1_epi32(std::ptr::read_unaligned(q.as_ptr().add(at).cast::<i32>()))
}

/// Values `at..at + 8` of scales or mins as f32 lanes.
#[inline(always)]
unsafe fn eight(params: &Params, at: usize) -> __m256 {
    match params {
        Params::F32(v) => {
            assert!(at + HALF <= v.len());
            _mm256_loadu_ps(v.as_ptr().add(at))
        }
        Params::F16(v) => {
            assert!(at + HALF <= v.len());
            _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(at).cast()))
        }
    }
}

/// Outputs of panel `p` for activation rows `m0..m0 + RN`. Zero-point formats start each
/// span's integer dot at `-zero_point · Σ levels`; formats with mins add `min · Σ x` per span;
/// 4-bit codes of a codebook (`BOOK`) become levels by one byte shuffle.
#[inline(always)]
unsafe fn tile<const VNNI: bool, const FOUR: bool, const MINS: bool, const BOOK: bool, const RN: usize>(
    w: &PackedMatrix,
    a: &Activations,
    p: usize,
    m0: usize,
    out: &Output,
) {
    let (span, spans, blocks) = (a.span, a.spans(), a.blocks());
    let (panel_bytes, groups) = (w.panel_bytes(), w.groups_per_row());
    assert!((p + 1) * panel_bytes <= w.values.len() && (m0 + RN) * a.padded_cols <= a.q.len());
    let panel = w.values.as_ptr().add(p * panel_bytes);
    let low = _mm256_set1_epi8(0x0F);
    // The codebook in both 128-bit lanes (`vpshufb` looks up within lanes).
    let book = _mm256_broadcastsi128_si256(_mm_loadu_si128(w.spec.codebook.unwrap_or_default().as_ptr().cast()));
    let mut acc = [[_mm256_setzero_ps(); 2]; RN];
    for s in 0..spans {
        let mut ints = [[_mm256_setzero_si256(); 2]; RN];
        if !MINS {
            for (n, row) in ints.iter_mut().enumerate() {
                *row = [_mm256_set1_epi32(a.starts[(m0 + n) * spans + s]); 2];
            }
        }
        let first_col = s * span;
        if FOUR {
            // 64 bytes per panel hold 8 columns: 4 in the low nibbles, 4 in the high.
            for c in (first_col..first_col + span).step_by(8) {
                // In bounds (asserted): the panel holds padded_cols / 8 slices of 64 bytes.
                let at = c / 8 * 64;
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(at + PREFETCH).cast());
                let halves = [0, 1].map(|h| _mm256_loadu_si256(panel.add(at + 32 * h).cast()));
                let mut lo = halves.map(|x| _mm256_and_si256(x, low));
                let mut hi = halves.map(|x| _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                if BOOK {
                    lo = lo.map(|x| _mm256_shuffle_epi8(book, x));
                    hi = hi.map(|x| _mm256_shuffle_epi8(book, x));
                }
                for (n, row) in ints.iter_mut().enumerate() {
                    let q = (m0 + n) * a.padded_cols + c;
                    let (x_lo, x_hi) = (broadcast4(&a.q, q), broadcast4(&a.q, q + 4));
                    for h in 0..2 {
                        row[h] = dot::<VNNI, false>(row[h], lo[h], x_lo);
                        row[h] = dot::<VNNI, false>(row[h], hi[h], x_hi);
                    }
                }
            }
        } else {
            for c in (first_col..first_col + span).step_by(4) {
                // In bounds (asserted): the panel holds padded_cols / 4 slices of 64 bytes.
                let at = c / 4 * 64;
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(at + PREFETCH).cast());
                let halves = [0, 1].map(|h| _mm256_loadu_si256(panel.add(at + 32 * h).cast()));
                for (n, row) in ints.iter_mut().enumerate() {
                    let x = broadcast4(&a.q, (m0 + n) * a.padded_cols + c);
                    for h in 0..2 {
                        row[h] = dot::<VNNI, true>(row[h], halves[h], x);
                    }
                }
            }
        }
        // In bounds: 16 scales (and mins) per panel and group, checked by `eight`.
        let at = (p * groups + first_col / w.spec.group) * PANEL;
        let block = first_col / a.block;
        for h in 0..2 {
            let scales = eight(&w.scales, at + h * HALF);
            let mins = match (MINS, &w.mins) {
                (true, Some(mins)) => eight(mins, at + h * HALF),
                _ => _mm256_setzero_ps(),
            };
            for (n, (row, ints)) in acc.iter_mut().zip(&ints).enumerate() {
                let d = _mm256_set1_ps(a.scales[(m0 + n) * blocks + block]);
                row[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints[h]), _mm256_mul_ps(scales, d), row[h]);
                if MINS {
                    let sum = _mm256_set1_ps(a.span_sums[(m0 + n) * spans + s]);
                    row[h] = _mm256_fmadd_ps(mins, sum, row[h]);
                }
            }
        }
    }
    store_tile(&acc, p, m0, out);
}

/// Stores a tile's accumulators (`acc[n][h]`: activation row `m0 + n`, rows `8h..8h + 8` of
/// panel `p`), leaving out the padding rows past the matrix's last.
#[inline(always)]
unsafe fn store_tile<const RN: usize>(acc: &[[__m256; 2]; RN], p: usize, m0: usize, out: &Output) {
    for (n, row) in acc.iter().enumerate() {
        for (h, &lanes) in row.iter().enumerate() {
            let first = p * PANEL + h * HALF;
            let n_valid = out.cols().saturating_sub(first).min(HALF);
            if n_valid == HALF {
                // In bounds: `out.at` checks the run of `n_valid` values it returns.
                _mm256_storeu_ps(out.at(m0 + n, first, n_valid), lanes);
            } else if n_valid > 0 {
                let mut values = [0f32; HALF];
                _mm256_storeu_ps(values.as_mut_ptr(), lanes);
                std::ptr::copy_nonoverlapping(values.as_ptr(), out.at(m0 + n, first, n_valid), n_valid);
            }
        }
    }
}

/// f16 products for the output columns of `panels`, every activation row of `x` (`[rows,
/// cols]`).
pub(super) fn half_product(w: &HalfMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    assert!(available(), "the 256-bit f16 kernel needs AVX2, FMA and F16C");
    check_units(&panels, w.panels);
    assert_eq!(x.len(), rows * w.cols, "activations are [rows, cols]");
    // SAFETY: the instructions are present (asserted above); loads stay inside the panels and
    // `x`, stores inside the output (see `half_tile`).
    unsafe { half_tiles(w, x, rows, panels, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_tiles(w: &HalfMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    for p in panels {
        let mut m = 0;
        while m + HALF_TILE_ACTS <= rows {
            half_tile::<HALF_TILE_ACTS>(w, x, p, m, out);
            m += HALF_TILE_ACTS;
        }
        match rows - m {
            1 => half_tile::<1>(w, x, p, m, out),
            2 => half_tile::<2>(w, x, p, m, out),
            3 => half_tile::<3>(w, x, p, m, out),
            4 => half_tile::<4>(w, x, p, m, out),
            5 => half_tile::<5>(w, x, p, m, out),
            _ => {}
        }
    }
}

/// Outputs of panel `p` for activation rows `m0..m0 + RN`.
#[inline(always)]
unsafe fn half_tile<const RN: usize>(w: &HalfMatrix, x: &[f32], p: usize, m0: usize, out: &Output) {
    let cols = w.cols;
    assert!((p + 1) * cols * PANEL <= w.values.len() && (m0 + RN) * cols <= x.len());
    let panel = w.values.as_ptr().add(p * cols * PANEL);
    let mut acc = [[_mm256_setzero_ps(); 2]; RN];
    for k in 0..cols {
        // In bounds (asserted): the panel holds cols × 16 values. One prefetch per 64-byte line.
        if k % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(k * PANEL + HALF_PREFETCH).cast());
        }
        let lanes = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(panel.add(k * PANEL + h * HALF).cast())));
        for (n, row) in acc.iter_mut().enumerate() {
            let xv = _mm256_set1_ps(*x.as_ptr().add((m0 + n) * cols + k));
            for (a, &l) in row.iter_mut().zip(&lanes) {
                *a = _mm256_fmadd_ps(l, xv, *a);
            }
        }
    }
    store_tile(&acc, p, m0, out);
}
