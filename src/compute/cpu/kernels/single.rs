//! The f32 panel kernel of the batch-invariant mode: per output, one fused multiply-add chain
//! over the columns in order, starting from zero. Written once in plain Rust (compiled for each
//! SIMD level, picked at run time): `mul_add` rounds once whatever the instruction set, so
//! every level, and the tile an output lands in, give the same bits.

use std::ops::Range;

use multiversion::multiversion;

use super::Output;
use crate::compute::cpu::packed::PANEL;
use crate::compute::cpu::single::SingleMatrix;

/// Panels per tile.
const TILE_PANELS: usize = 2;
/// Activation rows per tile in the bulk of a batch.
const TILE_ACTS: usize = 4;

/// Products for the output columns of `panels` (whole units of the matrix), every activation
/// row of `x` (`[rows, cols]`).
#[multiversion(targets = "simd")]
pub(super) fn product(w: &SingleMatrix, x: &[f32], rows: usize, panels: Range<usize>, out: &Output) {
    assert_eq!(x.len(), rows * w.cols, "activations are [rows, cols]");
    for p in panels.step_by(TILE_PANELS) {
        let mut m = 0;
        while m + TILE_ACTS <= rows {
            tile::<TILE_ACTS>(w, x, p, m, out);
            m += TILE_ACTS;
        }
        for m in m..rows {
            tile::<1>(w, x, p, m, out);
        }
    }
}

/// Outputs of panels `p0..p0 + 2` for activation rows `m0..m0 + RN`.
#[inline(always)]
fn tile<const RN: usize>(w: &SingleMatrix, x: &[f32], p0: usize, m0: usize, out: &Output) {
    let cols = w.cols;
    let panel = |p: usize| &w.values[(p0 + p) * cols * PANEL..(p0 + p + 1) * cols * PANEL];
    let panels: [&[f32]; TILE_PANELS] = std::array::from_fn(panel);
    let xs: [&[f32]; RN] = std::array::from_fn(|n| &x[(m0 + n) * cols..(m0 + n + 1) * cols]);
    let mut acc = [[[0f32; PANEL]; TILE_PANELS]; RN];
    for k in 0..cols {
        for (p, values) in panels.iter().enumerate() {
            let lanes: &[f32; PANEL] = values[k * PANEL..(k + 1) * PANEL].try_into().expect("a panel column");
            for (row, xs) in acc.iter_mut().zip(&xs) {
                let xv = xs[k];
                for (a, &l) in row[p].iter_mut().zip(lanes) {
                    *a = l.mul_add(xv, *a);
                }
            }
        }
    }
    for (n, row) in acc.iter().enumerate() {
        for (p, lanes) in row.iter().enumerate() {
            for (r, &v) in lanes.iter().enumerate() {
                let o = (p0 + p) * PANEL + r;
                if o < w.rows {
                    out.write(m0 + n, o, v);
                }
            }
        }
    }
}
