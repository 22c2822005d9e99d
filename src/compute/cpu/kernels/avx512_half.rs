//! AVX-512 kernel for f16 panels: per column, one 32-byte load widened to 16 f32 lanes (the
//! panel's rows) is multiplied with each activation row's value of that column, broadcast from
//! memory, into per-row accumulators; the bulk tile is 2 panels × 8 rows (16 accumulators).

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::store_tile;
use super::{check_units, Output, PANELS_PER_UNIT};
use crate::compute::cpu::half::HalfMatrix;
use crate::compute::cpu::packed::PANEL;

/// Activation rows per tile in the bulk of a batch.
const TILE_ACTS: usize = 8;
/// Values (4 KiB) ahead of the current column that are prefetched: the hardware prefetchers alone
/// leave decode tiles waiting on memory.
const PREFETCH: usize = 2048;

/// True when this CPU has the instructions (AVX-512 F widens f16).
fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Products for the output columns of `panels`, every activation row of `x` (`[rows, cols]`).
pub(super) fn product(w: &HalfMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    assert!(available(), "the f16 kernel needs AVX-512 F");
    check_units(&panels, w.panels);
    assert_eq!(x.len(), rows * w.cols, "activations are [rows, cols]");
    // SAFETY: AVX-512 F is present (asserted above); loads stay inside the panels and `x`, stores
    // inside the output (see `tile`).
    unsafe { tiles(w, x, rows, panels, out) }
}

#[target_feature(enable = "avx512f")]
unsafe fn tiles(w: &HalfMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    for p in panels.step_by(PANELS_PER_UNIT) {
        let mut m = 0;
        while m + TILE_ACTS <= rows {
            for q in (0..PANELS_PER_UNIT).step_by(2) {
                tile::<2, TILE_ACTS>(w, x, p + q, m, out);
            }
            m += TILE_ACTS;
        }
        while m + 4 <= rows {
            tile::<2, 4>(w, x, p, m, out);
            tile::<2, 4>(w, x, p + 2, m, out);
            m += 4;
        }
        match rows - m {
            1 => tile::<4, 1>(w, x, p, m, out),
            2 => {
                tile::<2, 2>(w, x, p, m, out);
                tile::<2, 2>(w, x, p + 2, m, out);
            }
            3 => {
                tile::<2, 3>(w, x, p, m, out);
                tile::<2, 3>(w, x, p + 2, m, out);
            }
            _ => {}
        }
    }
}

/// Outputs of panels `p0..p0 + P` for activation rows `m0..m0 + RN`.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const P: usize, const RN: usize>(w: &HalfMatrix, x: &[f32], p0: usize, m0: usize, out: &Output) {
    let cols = w.cols;
    assert!((p0 + P) * cols * PANEL <= w.values.len() && (m0 + RN) * cols <= x.len());
    let mut acc = [[_mm512_setzero_ps(); P]; RN];
    for k in 0..cols {
        let mut lanes = [_mm512_setzero_ps(); P];
        if k % 2 == 0 {
            for p in 0..P {
                let ahead = ((p0 + p) * cols + k) * PANEL + PREFETCH;
                _mm_prefetch::<_MM_HINT_T0>(w.values.as_ptr().wrapping_add(ahead).cast());
            }
        }
        for (p, l) in lanes.iter_mut().enumerate() {
            // In bounds (asserted): panel p0 + p holds cols × 16 values.
            let at = ((p0 + p) * cols + k) * PANEL;
            *l = _mm512_cvtph_ps(_mm256_loadu_si256(w.values.as_ptr().add(at).cast()));
        }
        for (n, row) in acc.iter_mut().enumerate() {
            // In bounds (asserted): activation row m0 + n holds cols values.
            let xv = _mm512_set1_ps(*x.as_ptr().add((m0 + n) * cols + k));
            for (a, &l) in row.iter_mut().zip(&lanes) {
                *a = _mm512_fmadd_ps(l, xv, *a);
            }
        }
    }
    store_tile(&acc, p0, m0, out);
}
