//! Embedding requests inside the engine's steps: which rows of a step's hidden states each
//! embedding sequence needs (`PoolPlan`), and each sequence's running pool (`Pooled`) until its
//! prompt is done and it yields one L2-normalised vector.

use crate::request::{Pooling, RequestId};
use crate::scheduler::SchedulerOutput;

/// One embedding sequence's share of a step's hidden states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PoolPart {
    /// Which sequence.
    pub id: RequestId,
    /// Its rows within the step's hidden states.
    pub rows: std::ops::Range<usize>,
    /// This step completes its prompt: the vector is ready after it.
    pub last_step: bool,
}

/// The hidden-state rows a step must return, and whose they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolPlan {
    /// Batch rows (token positions in the step) to return hidden states for.
    pub hidden_rows: Vec<u32>,
    /// Per embedding sequence, its slice of them.
    pub parts: Vec<PoolPart>,
}

impl PoolPlan {
    /// Plans the rows of `out`'s embedding sequences (`pooling_of` says which they are) and
    /// marks them non-sampling: an embedding never samples a token.
    pub fn new(out: &mut SchedulerOutput, pooling_of: impl Fn(RequestId) -> Option<Pooling>) -> Self {
        let mut plan = Self::default();
        let mut row = 0usize;
        for s in &mut out.seqs {
            let first_row = row;
            row += s.num_new;
            let Some(pooling) = pooling_of(s.id) else {
                continue;
            };
            let last_step = std::mem::take(&mut s.sample);
            let wanted = match pooling {
                Pooling::Mean => first_row..row,
                Pooling::Last if last_step => row - 1..row,
                Pooling::First if s.num_computed == 0 => first_row..first_row + 1,
                Pooling::Last | Pooling::First => row..row,
            };
            let start = plan.hidden_rows.len();
            plan.hidden_rows.extend(wanted.map(|r| r as u32));
            plan.parts.push(PoolPart {
                id: s.id,
                rows: start..plan.hidden_rows.len(),
                last_step,
            });
        }
        plan
    }
}

/// An embedding sequence's pool so far.
#[derive(Clone, Debug)]
pub(crate) struct Pooled {
    pooling: Pooling,
    sum: Vec<f64>,
    rows: usize,
}

impl Pooled {
    /// An empty pool.
    pub fn new(pooling: Pooling) -> Self {
        Self {
            pooling,
            sum: Vec::new(),
            rows: 0,
        }
    }

    /// Which pooling it applies.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Starts over (the sequence was preempted and will be recomputed).
    pub fn reset(&mut self) {
        self.sum.clear();
        self.rows = 0;
    }

    /// Adds hidden-state rows.
    pub fn add<'a>(&mut self, rows: impl IntoIterator<Item = &'a [f32]>) {
        for row in rows {
            if self.sum.is_empty() {
                self.sum = vec![0.0; row.len()];
            }
            for (s, &v) in self.sum.iter_mut().zip(row) {
                *s += f64::from(v);
            }
            self.rows += 1;
        }
    }

    /// The pooled vector, L2-normalised (a zero vector stays zero).
    pub fn vector(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        mean.iter().map(|v| (v * scale) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::ScheduledSeq;

    fn scheduled(id: u64, num_computed: usize, num_new: usize, sample: bool) -> ScheduledSeq {
        ScheduledSeq {
            id: RequestId(id),
            num_computed,
            num_new,
            sample,
        }
    }

    #[test]
    fn each_pooling_asks_for_its_rows_and_never_samples() {
        let mut out = SchedulerOutput {
            seqs: vec![
                scheduled(1, 5, 1, true),  // a generating sequence, row 0
                scheduled(2, 0, 3, false), // mean, first chunk: rows 1..4
                scheduled(3, 4, 2, true),  // last, final chunk: row 5
                scheduled(4, 0, 2, true),  // first: row 6
            ],
            preempted: Vec::new(),
        };
        let pooling = |id: RequestId| match id.0 {
            2 => Some(Pooling::Mean),
            3 => Some(Pooling::Last),
            4 => Some(Pooling::First),
            _ => None,
        };
        let plan = PoolPlan::new(&mut out, pooling);
        assert_eq!(plan.hidden_rows, vec![1, 2, 3, 5, 6]);
        let parts: Vec<(u64, std::ops::Range<usize>, bool)> = plan
            .parts
            .iter()
            .map(|p| (p.id.0, p.rows.clone(), p.last_step))
            .collect();
        assert_eq!(parts, vec![(2, 0..3, false), (3, 3..4, true), (4, 4..5, true)]);
        let samples: Vec<bool> = out.seqs.iter().map(|s| s.sample).collect();
        assert_eq!(samples, vec![true, false, false, false]);
    }

    #[test]
    fn the_pool_is_a_normalised_mean() {
        let mut p = Pooled::new(Pooling::Mean);
        p.add([&[3.0f32, 0.0][..], &[3.0, 8.0][..]]);
        assert_eq!(p.vector(), vec![0.6, 0.8]);
        p.reset();
        p.add([&[0.0f32, 0.0][..]]);
        assert_eq!(p.vector(), vec![0.0, 0.0]);
    }
}
