//! Validated sampling parameters: how the engine picks each token of one request.

/// How the next token is chosen from the logits. Inside a `ValidatedRequest` every field has
/// been range-checked by `validate`.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (None or 0 = all).
    pub top_k: Option<u32>,
    /// Nucleus sampling: keep the smallest set whose probability mass reaches top_p (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p times the top token's (0 = off).
    pub min_p: f32,
    /// Multiplicative penalty for tokens already in prompt or output (1 = off; HF/llama.cpp style).
    pub repetition_penalty: f32,
    /// Most recent tokens the repetition penalty looks at (None = the whole sequence).
    pub repeat_last_n: Option<usize>,
    /// Additive penalty for tokens present in the output (OpenAI semantics, 0 = off).
    pub presence_penalty: f32,
    /// Additive penalty times the count of a token in the output (OpenAI semantics, 0 = off).
    pub frequency_penalty: f32,
    /// Seed of this request's private RNG: same seed, same output, whatever else is batched.
    pub seed: Option<u64>,
    /// Number of top alternatives to report with each token; None = no logprobs at all.
    pub logprobs: Option<u8>,
    /// Number of top alternatives to report with each prompt token after the first (its
    /// logprob given the tokens before it); None = no prompt logprobs. The prompt is then
    /// computed whole, never read from the prefix cache.
    pub prompt_logprobs: Option<u8>,
    /// Added to a token's logit before sampling (-100 bans it, +100 forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Token ids whose raw logprob is reported with each sampled token, whatever was sampled
    /// (a reranker's `yes` and `no`).
    pub report_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            report_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties: the configuration of every golden test.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}
