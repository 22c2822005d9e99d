//! The f32 panel kernels of the batch-invariant mode: per output, one fused multiply-add chain
//! over the columns in order, starting from zero. A fused multiply-add rounds once on every
//! instruction set, so the AVX-512 and AVX2 kernels and the portable one give the same bits,
//! whichever tile an output lands in. The tiles are the f16 kernels' (per column, one load of
//! a panel's 16 rows, multiplied with each activation row's value broadcast) without the
//! widening.

use std::ops::Range;

use super::{check_units, Kernel, Output};
use crate::compute::cpu::packed::PANEL;
use crate::compute::cpu::single::SingleMatrix;

/// Products for the output columns of `panels` (whole units of the matrix), every activation
/// row of `x` (`[rows, cols]`), on `kernel`.
pub(super) fn product(kernel: Kernel, w: &SingleMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    check_units(&panels, w.panels);
    assert_eq!(x.len(), rows * w.cols, "activations are [rows, cols]");
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            assert!(is_x86_feature_detected!("avx512f"), "the f32 kernel needs AVX-512 F");
            // SAFETY: AVX-512 F is present (asserted); loads stay inside the panels and `x`,
            // stores inside the output (see `x86::tile512`).
            unsafe { x86::tiles512(w, x, rows, panels, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni | Kernel::Avx2 => {
            assert!(
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                "the 256-bit f32 kernel needs AVX2 and FMA"
            );
            // SAFETY: AVX2 and FMA are present (asserted); loads stay inside the panels and
            // `x`, stores inside the output (see `x86::tile256`).
            unsafe { x86::tiles256(w, x, rows, panels, out) }
        }
        _ => portable(w, x, rows, panels, out),
    }
}

/// Any CPU: the same chains, one output at a time.
fn portable(w: &SingleMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    let cols = w.cols;
    for p in panels {
        let panel = &w.values[p * cols * PANEL..(p + 1) * cols * PANEL];
        for r in 0..PANEL.min(w.rows.saturating_sub(p * PANEL)) {
            for (m, xs) in x.chunks_exact(cols.max(1)).take(rows).enumerate() {
                let chain = xs
                    .iter()
                    .enumerate()
                    .fold(0f32, |acc, (k, &xv)| panel[k * PANEL + r].mul_add(xv, acc));
                out.write(m, p * PANEL + r, chain);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::{Output, PANELS_PER_UNIT};
    use crate::compute::cpu::packed::PANEL;
    use crate::compute::cpu::single::SingleMatrix;

    /// Activation rows per tile in the bulk of a batch.
    const TILE_ACTS: usize = 8;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tiles512(w: &SingleMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
        for p in panels.step_by(PANELS_PER_UNIT) {
            let mut m = 0;
            while m + TILE_ACTS <= rows {
                tile512::<2, TILE_ACTS>(w, x, p, m, out);
                tile512::<2, TILE_ACTS>(w, x, p + 2, m, out);
                m += TILE_ACTS;
            }
            for m in m..rows {
                tile512::<4, 1>(w, x, p, m, out);
            }
        }
    }

    /// Outputs of panels `p0..p0 + P` for activation rows `m0..m0 + RN`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const P: usize, const RN: usize>(
        w: &SingleMatrix,
        x: &[f32],
        p0: usize,
        m0: usize,
        out: &Output,
    ) {
        let cols = w.cols;
        assert!((p0 + P) * cols * PANEL <= w.values.len() && (m0 + RN) * cols <= x.len());
        let mut acc = [[_mm512_setzero_ps(); P]; RN];
        for k in 0..cols {
            let mut lanes = [_mm512_setzero_ps(); P];
            for (p, l) in lanes.iter_mut().enumerate() {
                // In bounds (asserted): panel p0 + p holds cols × 16 values.
                *l = _mm512_loadu_ps(w.values.as_ptr().add(((p0 + p) * cols + k) * PANEL));
            }
            for (n, row) in acc.iter_mut().enumerate() {
                // In bounds (asserted): activation row m0 + n holds cols values.
                let xv = _mm512_set1_ps(*x.as_ptr().add((m0 + n) * cols + k));
                for (a, &l) in row.iter_mut().zip(&lanes) {
                    *a = _mm512_fmadd_ps(l, xv, *a);
                }
            }
        }
        for (n, row) in acc.iter().enumerate() {
            for (p, &lanes) in row.iter().enumerate() {
                let first = (p0 + p) * PANEL;
                let valid = w.rows.saturating_sub(first).min(PANEL);
                if valid > 0 {
                    let mask = (1u32 << valid).wrapping_sub(1) as u16;
                    // In bounds: `out.at` checks the run of `valid` values it returns.
                    _mm512_mask_storeu_ps(out.at(m0 + n, first, valid), mask, lanes);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles256(w: &SingleMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
        for p in panels {
            let mut m = 0;
            while m + 6 <= rows {
                tile256::<6>(w, x, p, m, out);
                m += 6;
            }
            for m in m..rows {
                tile256::<1>(w, x, p, m, out);
            }
        }
    }

    /// Outputs of panel `p` (two 8-lane halves) for activation rows `m0..m0 + RN`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const RN: usize>(w: &SingleMatrix, x: &[f32], p: usize, m0: usize, out: &Output) {
        let cols = w.cols;
        assert!((p + 1) * cols * PANEL <= w.values.len() && (m0 + RN) * cols <= x.len());
        let panel = w.values.as_ptr().add(p * cols * PANEL);
        let mut acc = [[_mm256_setzero_ps(); 2]; RN];
        for k in 0..cols {
            // In bounds (asserted): the panel holds cols × 16 values.
            let lanes = [0, 1].map(|h| _mm256_loadu_ps(panel.add(k * PANEL + h * PANEL / 2)));
            for (n, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.as_ptr().add((m0 + n) * cols + k));
                for (a, &l) in row.iter_mut().zip(&lanes) {
                    *a = _mm256_fmadd_ps(l, xv, *a);
                }
            }
        }
        let mut values = [0f32; PANEL];
        for (n, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(values.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(values.as_mut_ptr().add(PANEL / 2), row[1]);
            for (r, &v) in values.iter().enumerate().take(w.rows.saturating_sub(p * PANEL)) {
                out.write(m0 + n, p * PANEL + r, v);
            }
        }
    }
}
