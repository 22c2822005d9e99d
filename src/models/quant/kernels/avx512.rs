//! AVX-512 VNNI kernel: tiles of four weight rows × up to four activation rows. Each run of 64
//! levels is loaded once per tile and multiplied with `vpdpbusd` (unsigned weight levels ×
//! signed activation levels, 16 lanes of 4-value sums: lanes 0–7 one activation block, 8–15
//! the next); the lanes are converted to f32 and accumulated with the product of the weight
//! and activation scales of their lanes.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Activations, Output, LANES};
use crate::models::quant::packed::{PackedMatrix, RUN};

/// Weight rows per tile.
const TILE_ROWS: usize = 4;
/// Activation rows per tile.
const TILE_ACTS: usize = 4;

/// True when this CPU has the instructions (checked once per product by the caller's cache).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Products for output columns `range`, every activation row.
pub(super) fn product(w: &PackedMatrix, a: &Activations, range: Range<usize>, out: &Output) {
    assert!(available(), "the AVX-512 VNNI kernel needs AVX-512 F, BW and VNNI");
    let ctx = Ctx {
        w,
        a,
        out,
        lanes: scale_lane_groups(w.spec.group),
    };
    // SAFETY: the instructions are present (asserted above); every load stays inside the
    // padded rows, scales and mins (padded by four) and activation buffers (see `tile`).
    unsafe {
        match (w.spec.four_bit, w.mins.is_some()) {
            (true, true) => rows::<true, true>(&ctx, range),
            (true, false) => rows::<true, false>(&ctx, range),
            (false, true) => rows::<false, true>(&ctx, range),
            (false, false) => rows::<false, false>(&ctx, range),
        }
    }
}

/// For each of the 16 lanes of a run, which of the four scales loaded at the run's first group
/// applies: groups of 16 change every 4 lanes, of 32 every 8, of 64 or more never.
fn scale_lane_groups(group: usize) -> [i32; 16] {
    std::array::from_fn(|lane| (lane * 4 / group.min(RUN)) as i32 % (RUN / group.min(RUN)) as i32)
}

/// Everything a tile reads.
struct Ctx<'a> {
    w: &'a PackedMatrix,
    a: &'a Activations,
    out: &'a Output,
    lanes: [i32; 16],
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const FOUR: bool, const MINS: bool>(ctx: &Ctx, range: Range<usize>) {
    let mut o = range.start;
    while o + TILE_ROWS <= range.end {
        acts::<FOUR, MINS, TILE_ROWS>(ctx, o);
        o += TILE_ROWS;
    }
    while o < range.end {
        acts::<FOUR, MINS, 1>(ctx, o);
        o += 1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn acts<const FOUR: bool, const MINS: bool, const RM: usize>(ctx: &Ctx, o: usize) {
    let mut m = 0;
    while m + TILE_ACTS <= ctx.a.rows {
        tile::<FOUR, MINS, RM, TILE_ACTS>(ctx, o, m);
        m += TILE_ACTS;
    }
    match ctx.a.rows - m {
        1 => tile::<FOUR, MINS, RM, 1>(ctx, o, m),
        2 => tile::<FOUR, MINS, RM, 2>(ctx, o, m),
        3 => tile::<FOUR, MINS, RM, 3>(ctx, o, m),
        _ => {}
    }
}

/// Outputs `(m0..m0 + RN, o0..o0 + RM)`. Zero-point formats (`!MINS`) start each integer dot at
/// `-zero_point · Σ levels` of its lane, so the zero point costs nothing; formats with mins add
/// `min · d · Σ levels` per lane in f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const FOUR: bool, const MINS: bool, const RM: usize, const RN: usize>(ctx: &Ctx, o0: usize, m0: usize) {
    let (w, a) = (ctx.w, ctx.a);
    let runs = w.padded_cols / RUN;
    let (row_bytes, groups, group) = (w.row_bytes(), w.groups_per_row(), w.spec.group);
    let lane_idx = _mm512_loadu_si512(ctx.lanes.as_ptr().cast());
    let neg_zero_point = _mm512_set1_epi32(-i32::from(w.spec.zero_point.unwrap_or(0)));
    let mins = w.mins.as_deref().unwrap_or(&[]);
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); RM]; RN];
    for run in 0..runs {
        let mut levels = [_mm512_setzero_si512(); RM];
        let mut scales = [_mm512_setzero_ps(); RM];
        let mut min_lanes = [_mm512_setzero_ps(); RM];
        for r in 0..RM {
            let o = o0 + r;
            // In bounds: a row holds `runs` runs of RUN (8-bit) or RUN / 2 (4-bit) bytes.
            levels[r] = if FOUR {
                let packed = _mm256_loadu_si256(w.values.as_ptr().add(o * row_bytes + run * RUN / 2).cast());
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            } else {
                _mm512_loadu_si512(w.values.as_ptr().add(o * row_bytes + run * RUN).cast())
            };
            // In bounds: at most four values from the run's first group; scales and mins have
            // four spare values after the last row.
            let at = o * groups + run * RUN / group;
            scales[r] = _mm512_permutexvar_ps(
                lane_idx,
                _mm512_castps128_ps512(_mm_loadu_ps(w.scales.as_ptr().add(at))),
            );
            if MINS {
                min_lanes[r] =
                    _mm512_permutexvar_ps(lane_idx, _mm512_castps128_ps512(_mm_loadu_ps(mins.as_ptr().add(at))));
            }
        }
        for (n, acc_m) in acc.iter_mut().enumerate() {
            let lane = ((m0 + n) * runs + run) * LANES;
            let q = _mm512_loadu_si512(a.q.as_ptr().add((m0 + n) * a.padded_cols + run * RUN).cast());
            let d = _mm512_loadu_ps(a.scale_lanes.as_ptr().add(lane));
            let sums = _mm512_loadu_si512(a.lane_sums.as_ptr().add(lane).cast());
            let (start, sums_f) = if MINS {
                (_mm512_setzero_si512(), _mm512_mul_ps(_mm512_cvtepi32_ps(sums), d))
            } else {
                (_mm512_mullo_epi32(sums, neg_zero_point), _mm512_setzero_ps())
            };
            for r in 0..RM {
                let dot = _mm512_dpbusd_epi32(start, levels[r], q);
                let mut cell = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scales[r], d), acc_m[r]);
                if MINS {
                    cell = _mm512_fmadd_ps(min_lanes[r], sums_f, cell);
                }
                acc_m[r] = cell;
            }
        }
    }
    for (n, acc_m) in acc.iter().enumerate() {
        for (r, lanes) in acc_m.iter().enumerate() {
            ctx.out.write(m0 + n, o0 + r, _mm512_reduce_add_ps(*lanes));
        }
    }
}
