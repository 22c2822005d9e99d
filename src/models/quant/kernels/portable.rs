//! The kernel for any CPU: each weight row is unpacked once into levels, then dotted in
//! integers with every activation row, span by span.

use std::ops::Range;

use super::{Activations, Output, BLOCK};
use crate::models::quant::packed::PackedMatrix;

/// Products for output columns `range`, every activation row.
pub(super) fn product(w: &PackedMatrix, a: &Activations, range: Range<usize>, out: &Output) {
    let mut levels = vec![0u8; w.padded_cols];
    let g = w.spec.group;
    // Values per integer partial dot: a block, or a group when groups are finer (Q6_K).
    let span = g.min(BLOCK);
    for o in range {
        w.levels_of_row(o, &mut levels);
        for m in 0..a.rows {
            let q = &a.q[m * a.padded_cols..(m + 1) * a.padded_cols];
            let mut total = 0f32;
            for (s, (wl, al)) in levels.chunks_exact(span).zip(q.chunks_exact(span)).enumerate() {
                let (group, block) = (s * span / g, s * span / BLOCK);
                let idot: i32 = wl.iter().zip(al).map(|(&x, &y)| x as i32 * y as i32).sum();
                let asum: i32 = al.iter().map(|&y| y as i32).sum();
                let scale = w.scales[o * w.groups_per_row() + group];
                total += a.block_scale(m, block) * (scale * idot as f32 + w.min(o, group) * asum as f32);
            }
            out.write(m, o, total);
        }
    }
}
