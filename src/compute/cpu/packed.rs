//! One CPU layout for every quantized weight format: unsigned levels (4 bits, two per byte, or
//! 8 bits) with an f32 scale per group and either an f32 min per group or a zero point,
//! `w = scale · q + min`. GGUF blocks (Q4_0 … Q6_K, MXFP4) and MLX affine weights are repacked
//! into it once at load, so one kernel family (`kernels`) multiplies them all. A 4-bit format
//! whose codes are not evenly spaced (MXFP4's E2M1 values) keeps its codes and a 16-entry
//! codebook of levels, looked up as the kernels unpack the nibbles.
//!
//! Rows are kept in panels of 16, interleaved four values at a time: for each run of 4 columns
//! a panel holds 64 bytes, row r's 4 levels at bytes 4r..4r+4, so one 512-bit load gives 16
//! rows' 4-value slices and one integer dot-product instruction advances 16 outputs at once
//! (lanes are output rows; no horizontal sums). 4-bit panels keep columns 8c..8c+4 in the low
//! nibbles and 8c+4..8c+8 in the high nibbles of the same 64 bytes. Scales and mins are stored
//! per panel and group as 16 values (one per row). Columns are padded to a multiple of 64 and
//! rows to a multiple of 64 (four panels); padding levels, scales and mins are zero.
use candle_core::Result;
use half::f16;
use rayon::prelude::*;

/// Rows per panel (the lanes of one 512-bit vector of i32 sums).
pub const PANEL: usize = 16;
/// Columns are padded to a multiple of this; rows too (four panels).
pub const PAD: usize = 64;
/// Bytes per panel and run of 4 columns (8-bit), or of 8 columns (4-bit).
const SLICE: usize = 64;

/// One decoded row: a level per value, a scale per group, a min per group for formats that
/// store one.
#[derive(Debug, Default)]
pub struct Levels {
    /// Unsigned levels, one per value (4-bit codes where the spec has a codebook).
    pub q: Vec<u8>,
    /// One scale per group.
    pub scales: Vec<f32>,
    /// One min per group (empty for zero-point formats).
    pub mins: Vec<f32>,
}

impl Levels {
    fn clear(&mut self) {
        self.q.clear();
        self.scales.clear();
        self.mins.clear();
    }
}

/// How a matrix's groups turn levels into weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackSpec {
    /// Levels fit in 4 bits (or 4-bit codes index `codebook`).
    pub four_bit: bool,
    /// Values per scale (16, 32, or a multiple of 64).
    pub group: usize,
    /// `min = -zero_point · scale` when set; otherwise mins are stored.
    pub zero_point: Option<u8>,
    /// For 4-bit formats whose codes are not levels: the level of each code (at most 127, so
    /// the AVX2 kernel's pair sums cannot saturate).
    pub codebook: Option<[u8; 16]>,
}

impl PackSpec {
    /// The level a stored code stands for.
    pub fn level(&self, code: u8) -> u8 {
        self.codebook.map_or(code, |book| book[usize::from(code)])
    }
}

/// A quantized `[rows, cols]` matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) padded_cols: usize,
    pub(super) panels: usize,
    pub(super) spec: PackSpec,
    /// `panels` panels of `panel_bytes()` each.
    pub(super) values: Vec<u8>,
    /// Per panel and group, 16 scales (one per row).
    pub(super) scales: Params,
    /// Per panel and group, 16 mins; None for zero-point formats.
    pub(super) mins: Option<Params>,
}

/// Scales or mins, kept as f16 when every value is exactly an f16 (GGUF's Q4_0, Q5_0, Q8_0
/// scales; most MLX parameters): half the bytes a decode step reads for them.
#[derive(Debug, Clone)]
pub enum Params {
    /// Values that f16 holds exactly.
    F16(Vec<f16>),
    /// Any other values.
    F32(Vec<f32>),
}

impl Params {
    fn compact(values: Vec<f32>) -> Self {
        if values.iter().all(|&v| f16::from_f32(v).to_f32() == v) {
            Self::F16(values.iter().map(|&v| f16::from_f32(v)).collect())
        } else {
            Self::F32(values)
        }
    }

    /// Value `i`.
    pub(super) fn get(&self, i: usize) -> f32 {
        match self {
            Self::F16(v) => v[i].to_f32(),
            Self::F32(v) => v[i],
        }
    }
}

impl PackedMatrix {
    /// Packs `rows` rows of `cols` values, row `o` decoded by `decode(o, levels)` (called in
    /// parallel, each with an empty `Levels`).
    pub fn from_rows<F>(rows: usize, cols: usize, spec: PackSpec, decode: F) -> Result<Self>
    where
        F: Fn(usize, &mut Levels) + Sync,
    {
        let g = spec.group;
        if !(g == 16 || g == 32 || g.is_multiple_of(PAD)) || !cols.is_multiple_of(g) {
            candle_core::bail!("cannot pack groups of {g} over rows of {cols} values");
        }
        if spec
            .codebook
            .is_some_and(|book| !spec.four_bit || book.iter().any(|&l| l > 127))
        {
            candle_core::bail!("a codebook holds 4-bit codes' levels of at most 127");
        }
        let padded_cols = cols.next_multiple_of(PAD.max(g));
        let panels = rows.next_multiple_of(PAD) / PANEL;
        let mut m = Self {
            rows,
            cols,
            padded_cols,
            panels,
            spec,
            values: Vec::new(),
            scales: Params::F32(Vec::new()),
            mins: None,
        };
        let per_panel = m.groups_per_row() * PANEL;
        let mut values = vec![0u8; panels * m.panel_bytes()];
        let mut scales = vec![0f32; panels * per_panel];
        // Mins are kept only by formats that store them; zero-point formats drop them.
        let mut mins = vec![0f32; panels * per_panel];
        let n = cols / g;
        let bad_row = values
            .par_chunks_mut(m.panel_bytes())
            .zip(scales.par_chunks_mut(per_panel))
            .zip(mins.par_chunks_mut(per_panel))
            .enumerate()
            .map_init(Levels::default, |levels, (p, ((bytes, panel_scales), panel_mins))| {
                for r in 0..PANEL {
                    let o = p * PANEL + r;
                    if o >= rows {
                        break;
                    }
                    levels.clear();
                    decode(o, levels);
                    let fits = levels.q.len() == cols
                        && levels.scales.len() == n
                        && levels.mins.len() == if spec.zero_point.is_some() { 0 } else { n }
                        && (!spec.four_bit || levels.q.iter().all(|&q| q < 16));
                    if !fits {
                        return Some(o);
                    }
                    for (k, &q) in levels.q.iter().enumerate() {
                        let (at, shift) = level_at(spec.four_bit, r, k);
                        bytes[at] |= q << shift;
                    }
                    for (group, (&s, m)) in levels
                        .scales
                        .iter()
                        .zip(levels.mins.iter().chain(std::iter::repeat(&0.0)))
                        .enumerate()
                    {
                        panel_scales[group * PANEL + r] = s;
                        panel_mins[group * PANEL + r] = *m;
                    }
                }
                None
            })
            .find_any(|bad| bad.is_some())
            .flatten();
        if let Some(o) = bad_row {
            candle_core::bail!("row {o} did not decode to {cols} levels with its groups");
        }
        m.values = values;
        m.scales = Params::compact(scales);
        m.mins = spec.zero_point.is_none().then(|| Params::compact(mins));
        Ok(m)
    }

    /// Output rows.
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn in_dim(&self) -> usize {
        self.cols
    }

    /// Bytes held: levels, scales and mins (what a product reads).
    pub fn bytes(&self) -> usize {
        let params = |p: &Params| match p {
            Params::F16(v) => v.len() * 2,
            Params::F32(v) => v.len() * 4,
        };
        self.values.len() + params(&self.scales) + self.mins.as_ref().map_or(0, params)
    }

    pub(super) fn groups_per_row(&self) -> usize {
        self.padded_cols / self.spec.group
    }

    pub(super) fn panel_bytes(&self) -> usize {
        PANEL
            * if self.spec.four_bit {
                self.padded_cols / 2
            } else {
                self.padded_cols
            }
    }

    /// Rows `start..start + n` as their own matrix (splitting fused projections).
    pub fn rows(&self, start: usize, n: usize) -> Result<Self> {
        Self::from_rows(n, self.cols, self.spec, |o, levels| self.decode_row(start + o, levels))
    }

    /// The rows of `parts` one after the other (fusing projections that read the same input:
    /// one activation quantization and one product instead of several), or None unless the
    /// parts share their width and format.
    pub fn stack(parts: &[&Self]) -> Result<Option<Self>> {
        let first = parts.first().expect("at least one part");
        let same = |m: &&Self| m.cols == first.cols && m.spec == first.spec;
        if !parts.iter().all(same) {
            return Ok(None);
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        Self::from_rows(rows, first.cols, first.spec, |mut o, levels| {
            for part in parts {
                if o < part.rows {
                    return part.decode_row(o, levels);
                }
                o -= part.rows;
            }
        })
        .map(Some)
    }

    /// Row `o` back in its decoded form.
    fn decode_row(&self, o: usize, levels: &mut Levels) {
        let groups = self.cols / self.spec.group;
        let mut q = vec![0u8; self.padded_cols];
        self.codes_of_row(o, &mut q);
        levels.q.extend_from_slice(&q[..self.cols]);
        levels.scales.extend((0..groups).map(|g| self.scale(o, g)));
        if self.mins.is_some() {
            levels.mins.extend((0..groups).map(|g| self.min(o, g)));
        }
    }

    /// The levels of row `o`, `padded_cols` of them, in order (codes looked up in the
    /// codebook).
    pub(super) fn levels_of_row(&self, o: usize, out: &mut [u8]) {
        self.codes_of_row(o, out);
        if self.spec.codebook.is_some() {
            for level in out.iter_mut() {
                *level = self.spec.level(*level);
            }
        }
    }

    /// The codes of row `o` as stored, `padded_cols` of them, in order.
    fn codes_of_row(&self, o: usize, out: &mut [u8]) {
        let (p, r) = (o / PANEL, o % PANEL);
        let panel = &self.values[p * self.panel_bytes()..(p + 1) * self.panel_bytes()];
        let mask = if self.spec.four_bit { 0x0F } else { 0xFF };
        for (k, level) in out.iter_mut().enumerate() {
            let (at, shift) = level_at(self.spec.four_bit, r, k);
            *level = (panel[at] >> shift) & mask;
        }
    }

    /// The scale of group `g` of row `o`.
    pub(super) fn scale(&self, o: usize, g: usize) -> f32 {
        self.scales.get(self.param_at(o, g))
    }

    /// The additive term of group `g` of row `o`.
    pub(super) fn min(&self, o: usize, g: usize) -> f32 {
        match (&self.mins, self.spec.zero_point) {
            (Some(mins), _) => mins.get(self.param_at(o, g)),
            (None, zp) => -(zp.unwrap_or(0) as f32) * self.scale(o, g),
        }
    }

    fn param_at(&self, o: usize, g: usize) -> usize {
        ((o / PANEL) * self.groups_per_row() + g) * PANEL + o % PANEL
    }

    /// Row `o` as weights, `cols` of them.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let mut levels = vec![0u8; self.padded_cols];
        self.levels_of_row(o, &mut levels);
        let g = self.spec.group;
        for (k, (w, &q)) in out.iter_mut().zip(&levels).enumerate() {
            *w = self.scale(o, k / g) * q as f32 + self.min(o, k / g);
        }
    }
}

/// Byte and bit shift of level `k` of row `r` within its panel.
fn level_at(four_bit: bool, r: usize, k: usize) -> (usize, u32) {
    if four_bit {
        let (slice, within) = (k / 8, k % 8);
        (slice * SLICE + r * 4 + within % 4, 4 * (within / 4) as u32)
    } else {
        ((k / 4) * SLICE + r * 4 + k % 4, 0)
    }
}
