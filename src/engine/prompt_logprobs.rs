//! Prompt logprobs inside the engine's steps: which extra logits rows a step computes for the
//! prompt positions of sequences that asked for them (`PromptRows`). The row at position `p`
//! predicts the prompt token at `p + 1`; the prompt's last position is the sampling row, so
//! it is not among them.

use crate::request::RequestId;
use crate::scheduler::SchedulerOutput;

/// One sequence's share of a step's prompt rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PromptPart {
    /// Which sequence.
    pub id: RequestId,
    /// Position of the prompt token its first row predicts.
    pub first: usize,
    /// Its rows among the step's prompt rows.
    pub rows: std::ops::Range<usize>,
}

/// The prompt rows of one step, appended after the sampling rows of its logits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PromptRows {
    /// Batch rows (token positions in the step) whose logits are wanted.
    pub batch_rows: Vec<u32>,
    /// Per sequence, its slice of them.
    pub parts: Vec<PromptPart>,
}

impl PromptRows {
    /// Plans the rows of `out`'s sequences for which `prompt_len_of` gives a prompt length
    /// (those that asked for prompt logprobs).
    pub fn new(out: &SchedulerOutput, prompt_len_of: impl Fn(RequestId) -> Option<usize>) -> Self {
        let mut plan = Self::default();
        let mut row = 0usize;
        for s in &out.seqs {
            let first_row = row;
            row += s.num_new;
            let Some(prompt_len) = prompt_len_of(s.id) else {
                continue;
            };
            let end = (s.num_computed + s.num_new).min(prompt_len.saturating_sub(1));
            if end <= s.num_computed {
                continue;
            }
            let start = plan.batch_rows.len();
            plan.batch_rows
                .extend((first_row..first_row + (end - s.num_computed)).map(|r| r as u32));
            plan.parts.push(PromptPart {
                id: s.id,
                first: s.num_computed + 1,
                rows: start..plan.batch_rows.len(),
            });
        }
        plan
    }

    /// Whether the step computes no prompt rows.
    pub fn is_empty(&self) -> bool {
        self.batch_rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::ScheduledSeq;

    fn seq(id: u64, num_computed: usize, num_new: usize) -> ScheduledSeq {
        ScheduledSeq {
            id: RequestId(id),
            num_computed,
            num_new,
            sample: false,
        }
    }

    #[test]
    fn rows_cover_the_prompt_chunks_of_the_sequences_that_ask() {
        let out = SchedulerOutput {
            seqs: vec![seq(1, 0, 4), seq(2, 10, 1), seq(3, 4, 4), seq(4, 0, 3)],
            ..Default::default()
        };
        // 1 and 3 are one 8-token prompt in two chunks; 2 asks nothing; 4 is a 3-token prompt.
        let plan = PromptRows::new(&out, |id| match id.0 {
            1 | 3 => Some(8),
            4 => Some(3),
            _ => None,
        });
        assert_eq!(plan.batch_rows, [0, 1, 2, 3, 5, 6, 7, 9, 10]);
        assert_eq!(
            plan.parts,
            [
                PromptPart {
                    id: RequestId(1),
                    first: 1,
                    rows: 0..4
                },
                // Position 7 is the prompt's last: it samples, so its chunk gives three rows.
                PromptPart {
                    id: RequestId(3),
                    first: 5,
                    rows: 4..7
                },
                PromptPart {
                    id: RequestId(4),
                    first: 1,
                    rows: 7..9
                },
            ]
        );
    }

    #[test]
    fn a_decode_step_or_a_one_token_prompt_adds_nothing() {
        let out = SchedulerOutput {
            seqs: vec![seq(1, 8, 1), seq(2, 0, 1)],
            ..Default::default()
        };
        assert!(PromptRows::new(&out, |id| Some(if id.0 == 1 { 8 } else { 1 })).is_empty());
    }
}
