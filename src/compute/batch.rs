//! The packed input of one forward pass: every scheduled token of every sequence, flattened.

use candle_core::Tensor;

/// One step's tokens and their KV addressing, already on the model's device.
///
/// ```text
///  seq A: prefill 3 tokens, seq B: decode 1 token
///  token_ids:     [a0 a1 a2 | b7]          positions:   [0 1 2 | 7]
///  slot_mapping:  where each new K/V row is written (block_id * block_size + offset)
///  context_slots: [slots of A's positions 0..3 | slots of B's positions 0..8]
///  q_lens = [3, 1], kv_lens = [3, 8], logits_rows = [2, 3]
/// ```
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// `[T]` u32: token ids of all sequences concatenated.
    pub token_ids: Tensor,
    /// `[T]` u32: absolute position of each token in its sequence.
    pub positions: Tensor,
    /// `[T]` u32: KV slot each new token's K/V is written to.
    pub slot_mapping: Tensor,
    /// `[sum kv_lens]` u32: KV slots of every sequence's whole context, in position order.
    pub context_slots: Tensor,
    /// Tokens fed per sequence this step.
    pub q_lens: Vec<usize>,
    /// Context length per sequence after this step (cached + new).
    pub kv_lens: Vec<usize>,
    /// `[S]` u32: row of the last token of each sequence that samples.
    pub logits_rows: Tensor,
    /// Set when the batch lives in fixed device buffers (a decode step replayed from a CUDA
    /// graph): the model must then derive nothing per step from host data, and `kv_lens` only
    /// bounds each context.
    pub fixed: Option<FixedDecode>,
    /// Image soft tokens fed this step (None: text only).
    pub images: Option<ImageRows>,
}

/// The image soft tokens of a step: their embeddings stand in for the token embeddings of
/// their rows, and each attends to its whole image, later soft tokens included (a vision
/// model's image block is bidirectional).
#[derive(Debug, Clone)]
pub struct ImageRows {
    /// `[N]` u32: the batch rows that are soft tokens.
    pub rows: Tensor,
    /// `[N, hidden]`: their embeddings, from the vision encoder.
    pub embeds: Tensor,
    /// Per row of the whole batch, the last position it attends to: its own position for
    /// text, the last soft token of its image for a soft token.
    pub last_visible: Vec<u32>,
}

/// A decode batch's sequence table, already on the device (see `BatchInput::fixed`).
#[derive(Debug, Clone)]
pub struct FixedDecode {
    /// `[S, 4]` u32 per sequence: {its token row, 1, offset of its context in
    /// `context_slots`, its token's position}.
    pub seqs: Tensor,
    /// The longest context the buffers hold.
    pub max_context: usize,
}

impl BatchInput {
    /// Total tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.q_lens.iter().sum()
    }
}
