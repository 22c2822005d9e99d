//! The kernel for any CPU: each weight row is unpacked once into levels, then dotted in
//! integers with every activation row, span by span.

use std::ops::Range;

use super::{Activations, Output};
use crate::compute::cpu::half::HalfMatrix;
use crate::compute::cpu::packed::PackedMatrix;

/// Products for output columns (weight rows) `range`, every activation row.
pub(super) fn product(w: &PackedMatrix, a: &Activations, range: Range<usize>, out: &Output) {
    let mut levels = vec![0u8; w.padded_cols];
    let (span, spans) = (a.span, a.spans());
    for o in range {
        w.levels_of_row(o, &mut levels);
        for m in 0..a.rows {
            let q = &a.q[m * a.padded_cols..(m + 1) * a.padded_cols];
            let mut total = 0f32;
            for (s, (wl, al)) in levels.chunks_exact(span).zip(q.chunks_exact(span)).enumerate() {
                let group = s * span / w.spec.group;
                let dot: i32 = wl.iter().zip(al).map(|(&x, &y)| x as i32 * y as i32).sum();
                let int = dot + a.starts[m * spans + s];
                total += a.scale(m, s * span) * w.scale(o, group) * int as f32;
                if w.mins.is_some() {
                    total += w.min(o, group) * a.span_sums[m * spans + s];
                }
            }
            out.write(m, o, total);
        }
    }
}

/// f16 products for output columns (weight rows) `range`, every activation row.
pub(super) fn half_product(w: &HalfMatrix, x: &[f32], rows: usize, range: Range<usize>, out: &Output) {
    let mut row = vec![0f32; w.cols];
    for o in range {
        w.dequantize_row(o, &mut row);
        for (m, xs) in x.chunks_exact(w.cols).take(rows).enumerate() {
            out.write(m, o, row.iter().zip(xs).map(|(a, b)| a * b).sum());
        }
    }
}
