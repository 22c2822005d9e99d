//! Causal rerankers in the Qwen3-Reranker style: the model reads a judging prompt (an
//! instruction, the query and one document in its own chat format, its thought closed) and the
//! relevance is how much more it would answer `yes` than `no`:
//! `softmax([logit(no), logit(yes)])[1]`, as the model card and transformers compute it.

use super::TextCodec;

/// The instruction of a request that gives none (the model card's default).
pub const DEFAULT_INSTRUCTION: &str = "Given a web search query, retrieve relevant passages that answer the query";

/// The judging prompt around the instruction, query and document.
const PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and \
                      the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n\
                      <|im_start|>user\n";
const SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";

/// A model's reranking format: the ids of its `yes` and `no` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reranker {
    /// The token `yes`.
    pub yes: u32,
    /// The token `no`.
    pub no: u32,
}

impl Reranker {
    /// Whether a model of this name is a reranker (`Qwen3-Reranker-0.6B`, a folder or Ollama
    /// name holding "rerank"): what listings say before a model is loaded.
    pub fn named(name: &str) -> bool {
        name.to_ascii_lowercase().contains("rerank")
    }

    /// The format of a model named `name` with this tokenizer, or None when it is not a
    /// reranker (by name) or its vocabulary has no single-token `yes` and `no`.
    pub fn of(name: &str, codec: &TextCodec) -> Option<Self> {
        if !Self::named(name) {
            return None;
        }
        let tokenizer = codec.tokenizer();
        Some(Self {
            yes: tokenizer.token_to_id("yes")?,
            no: tokenizer.token_to_id("no")?,
        })
    }

    /// The judging prompt for one document.
    pub fn prompt(instruction: &str, query: &str, document: &str) -> String {
        format!("{PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}{SUFFIX}")
    }

    /// The relevance from the logprobs of `yes` and `no` (any common offset cancels).
    pub fn relevance(logprob_yes: f32, logprob_no: f32) -> f32 {
        1.0 / (1.0 + (logprob_no - logprob_yes).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relevance_is_the_softmax_of_no_and_yes() {
        assert_eq!(Reranker::relevance(-1.0, -1.0), 0.5);
        let (yes, no) = (0.3f32, -2.1f32);
        let softmax = yes.exp() / (yes.exp() + no.exp());
        assert!((Reranker::relevance(yes, no) - softmax).abs() < 1e-6);
        assert!(Reranker::relevance(5.0, -5.0) > 0.99);
    }

    #[test]
    fn rerankers_are_known_by_name() {
        assert!(Reranker::named("Qwen/Qwen3-Reranker-0.6B"));
        assert!(Reranker::named("dengcao/qwen3-reranker-4b:q8_0"));
        assert!(!Reranker::named("qwen3:0.6b"));
    }
}
