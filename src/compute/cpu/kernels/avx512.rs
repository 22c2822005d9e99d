//! AVX-512 VNNI kernel over panels of 16 weight rows. For each 4 columns, one 512-bit load holds
//! the panel's 16 rows × 4 levels and `vpdpbusd` adds, in lane r, row r's 4 levels times one
//! activation row's 4 levels (broadcast from memory): the lanes are outputs, so a span's
//! integer sums need no horizontal reduction, and each is scaled in f32 once per span (16
//! outputs per instruction). A tile is P panels × RN activation rows with P·RN independent
//! accumulator chains; the weights of a tile are read once for its RN rows.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{check_units, Activations, Output, PANELS_PER_UNIT};
use crate::compute::cpu::packed::{PackedMatrix, Params, PANEL};

/// Activation rows per tile in the bulk of a batch, each tile two panels wide: 12 integer and
/// 12 float accumulators, and two weight loads serve 12 broadcast activations.
const TILE_ACTS: usize = 6;
/// Activation rows per cache chunk: each panel is reused across this many rows while they
/// stay in cache.
const CHUNK_ACTS: usize = 128;
/// Bytes ahead of the current position in a panel that are prefetched: the hardware
/// prefetchers alone leave decode tiles waiting on memory.
const PREFETCH: usize = 8192;

/// True when this CPU has the instructions.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Products for the output columns of `panels` (16 weight rows each), every activation row.
pub(super) fn product(w: &PackedMatrix, a: &Activations, panels: Range<usize>, out: &Output) {
    assert!(available(), "the AVX-512 VNNI kernel needs AVX-512 F, BW and VNNI");
    check_units(&panels, w.panels);
    // SAFETY: the instructions are present (asserted above); every load stays inside the
    // matrix's panels and the activation buffers, every store inside the output (see `tile`).
    unsafe {
        match (w.spec.four_bit, w.mins.is_some(), w.spec.codebook.is_some()) {
            (true, true, false) => chunks::<true, true, false>(w, a, panels, out),
            (true, false, false) => chunks::<true, false, false>(w, a, panels, out),
            (true, false, true) => chunks::<true, false, true>(w, a, panels, out),
            (false, true, _) => chunks::<false, true, false>(w, a, panels, out),
            (false, false, _) => chunks::<false, false, false>(w, a, panels, out),
            (true, true, true) => unreachable!("codebook formats have a zero point"),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn chunks<const FOUR: bool, const MINS: bool, const BOOK: bool>(
    w: &PackedMatrix,
    a: &Activations,
    panels: Range<usize>,
    out: &Output,
) {
    for m0 in (0..a.rows).step_by(CHUNK_ACTS) {
        let m_end = (m0 + CHUNK_ACTS).min(a.rows);
        for p in panels.clone().step_by(PANELS_PER_UNIT) {
            let mut m = m0;
            while m + TILE_ACTS <= m_end {
                for q in (0..PANELS_PER_UNIT).step_by(2) {
                    tile::<FOUR, MINS, BOOK, 2, TILE_ACTS>(w, a, p + q, m, out);
                }
                m += TILE_ACTS;
            }
            if m + 4 <= m_end {
                tile::<FOUR, MINS, BOOK, 2, 4>(w, a, p, m, out);
                tile::<FOUR, MINS, BOOK, 2, 4>(w, a, p + 2, m, out);
                m += 4;
            }
            match m_end - m {
                1 => tile::<FOUR, MINS, BOOK, 4, 1>(w, a, p, m, out),
                2 => {
                    tile::<FOUR, MINS, BOOK, 2, 2>(w, a, p, m, out);
                    tile::<FOUR, MINS, BOOK, 2, 2>(w, a, p + 2, m, out);
                }
                3 => {
                    tile::<FOUR, MINS, BOOK, 2, 3>(w, a, p, m, out);
                    tile::<FOUR, MINS, BOOK, 2, 3>(w, a, p + 2, m, out);
                }
                _ => {}
            }
        }
    }
}

/// Values `at..at + 16` of scales or mins as f32 lanes.
#[inline(always)]
unsafe fn sixteen(params: &Params, at: usize) -> __m512 {
    match params {
        Params::F32(v) => {
            assert!(at + 16 <= v.len());
            _mm512_loadu_ps(v.as_ptr().add(at))
        }
        Params::F16(v) => {
            assert!(at + 16 <= v.len());
            _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at).cast()))
        }
    }
}

/// Four activation levels at `q[at..at + 4]` broadcast to every lane.
#[inline(always)]
unsafe fn broadcast4(q: &[i8], at: usize) -> __m512i {
    debug_assert!(at + 4 <= q.len());
    _mm512_set1_epi32(std::ptr::read_unaligned(q.as_ptr().add(at).cast::<i32>()))
}

/// Outputs of panels `p0..p0 + P` for activation rows `m0..m0 + RN`. Zero-point formats start
/// each span's integer dot at `-zero_point · Σ levels`; formats with mins add `min · Σ x` per
/// span in f32; 4-bit codes of a codebook (`BOOK`) become levels by one byte shuffle.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const FOUR: bool, const MINS: bool, const BOOK: bool, const P: usize, const RN: usize>(
    w: &PackedMatrix,
    a: &Activations,
    p0: usize,
    m0: usize,
    out: &Output,
) {
    let (span, spans, blocks) = (a.span, a.spans(), a.blocks());
    let (panel_bytes, groups) = (w.panel_bytes(), w.groups_per_row());
    let low = _mm512_set1_epi8(0x0F);
    // The codebook in every 128-bit lane (`vpshufb` looks up within lanes).
    let book = _mm512_broadcast_i32x4(_mm_loadu_si128(w.spec.codebook.unwrap_or_default().as_ptr().cast()));
    let mut acc = [[_mm512_setzero_ps(); P]; RN];
    for s in 0..spans {
        let mut ints = [[_mm512_setzero_si512(); P]; RN];
        if !MINS {
            for (n, row) in ints.iter_mut().enumerate() {
                *row = [_mm512_set1_epi32(a.starts[(m0 + n) * spans + s]); P];
            }
        }
        let first_col = s * span;
        if FOUR {
            // 64 bytes per panel hold 8 columns: 4 in the low nibbles, 4 in the high.
            for c in (first_col..first_col + span).step_by(8) {
                for p in 0..P {
                    // In bounds: the panel holds padded_cols / 8 slices of 64 bytes.
                    let at = (p0 + p) * panel_bytes + c / 8 * 64;
                    _mm_prefetch::<_MM_HINT_T0>(w.values.as_ptr().wrapping_add(at + PREFETCH).cast());
                    let x = _mm512_loadu_si512(w.values.as_ptr().add(at).cast());
                    let mut lo = _mm512_and_si512(x, low);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
                    if BOOK {
                        lo = _mm512_shuffle_epi8(book, lo);
                        hi = _mm512_shuffle_epi8(book, hi);
                    }
                    for (n, row) in ints.iter_mut().enumerate() {
                        let q = (m0 + n) * a.padded_cols + c;
                        row[p] = _mm512_dpbusd_epi32(row[p], lo, broadcast4(&a.q, q));
                        row[p] = _mm512_dpbusd_epi32(row[p], hi, broadcast4(&a.q, q + 4));
                    }
                }
            }
        } else {
            for c in (first_col..first_col + span).step_by(4) {
                for p in 0..P {
                    // In bounds: the panel holds padded_cols / 4 slices of 64 bytes.
                    let at = (p0 + p) * panel_bytes + c / 4 * 64;
                    _mm_prefetch::<_MM_HINT_T0>(w.values.as_ptr().wrapping_add(at + PREFETCH).cast());
                    let x = _mm512_loadu_si512(w.values.as_ptr().add(at).cast());
                    for (n, row) in ints.iter_mut().enumerate() {
                        row[p] = _mm512_dpbusd_epi32(row[p], x, broadcast4(&a.q, (m0 + n) * a.padded_cols + c));
                    }
                }
            }
        }
        let g = first_col / w.spec.group;
        let mut scales = [_mm512_setzero_ps(); P];
        let mut min_lanes = [_mm512_setzero_ps(); P];
        for p in 0..P {
            // In bounds: 16 scales (and mins) per panel and group.
            let at = ((p0 + p) * groups + g) * PANEL;
            scales[p] = sixteen(&w.scales, at);
            if let (true, Some(mins)) = (MINS, &w.mins) {
                min_lanes[p] = sixteen(mins, at);
            }
        }
        let block = first_col / a.block;
        for (n, (row, ints)) in acc.iter_mut().zip(&ints).enumerate() {
            let d = _mm512_set1_ps(a.scales[(m0 + n) * blocks + block]);
            let sum = _mm512_set1_ps(if MINS { a.span_sums[(m0 + n) * spans + s] } else { 0.0 });
            for p in 0..P {
                row[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints[p]), _mm512_mul_ps(scales[p], d), row[p]);
                if MINS {
                    row[p] = _mm512_fmadd_ps(min_lanes[p], sum, row[p]);
                }
            }
        }
    }
    store_tile(&acc, p0, m0, out);
}

/// Stores a tile's accumulators (`acc[n][p]`: activation row `m0 + n`, the 16 rows of panel
/// `p0 + p`), masking off the padding rows past the matrix's last.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_tile<const P: usize, const RN: usize>(
    acc: &[[__m512; P]; RN],
    p0: usize,
    m0: usize,
    out: &Output,
) {
    for (n, row) in acc.iter().enumerate() {
        for (p, &lanes) in row.iter().enumerate() {
            let first = (p0 + p) * PANEL;
            let n_valid = out.cols().saturating_sub(first).min(PANEL);
            if n_valid > 0 {
                let mask = (1u32 << n_valid).wrapping_sub(1) as u16;
                // In bounds: `out.at` checks the run of `n_valid` values it returns.
                _mm512_mask_storeu_ps(out.at(m0 + n, first, n_valid), mask, lanes);
            }
        }
    }
}
