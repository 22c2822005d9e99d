//! Output constraints (a JSON object, a JSON schema) compiled against the model's tokenizer
//! with llguidance, the grammar engine llama.cpp and vLLM use. A `Constraint` is one request's
//! matcher: it names the tokens that may come next (a bitmask the samplers apply before they
//! choose) and follows every token chosen, so the output always parses and validates.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// What a request's output must be.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputConstraint {
    /// Any JSON object (OpenAI `json_object`, Ollama `format: "json"`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
}

impl OutputConstraint {
    /// The schema llguidance compiles: compact JSON (no free whitespace between tokens, as
    /// OpenAI's structured outputs), which also keeps a weak model from padding with blanks.
    fn schema(&self) -> Value {
        let mut schema = match self {
            Self::JsonObject => json!({"type": "object"}),
            Self::JsonSchema(s) => s.clone(),
        };
        if let Value::Object(map) = &mut schema {
            map.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        schema
    }
}

/// Builds constraints for one tokenizer. The token trie is made on first use: it takes a
/// moment for a 150k-token vocabulary, which requests without constraints never pay.
pub struct GrammarCompiler {
    tokenizer_json: String,
    eos_ids: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl GrammarCompiler {
    /// A compiler for the tokenizer serialized as `tokenizer_json`, whose generation ends at
    /// `eos_ids`.
    pub fn new(tokenizer_json: String, eos_ids: Vec<u32>) -> Self {
        Self {
            tokenizer_json,
            eos_ids,
            factory: OnceLock::new(),
        }
    }

    /// A fresh matcher for `constraint` over a `vocab`-wide logits row, or why it cannot be
    /// enforced (an unsupported schema feature, a malformed schema).
    pub fn compile(&self, constraint: &OutputConstraint, vocab: usize) -> Result<Constraint, String> {
        let factory = self
            .factory
            .get_or_init(|| self.build_factory(vocab).map(Arc::new))
            .as_ref()
            .map_err(|e| format!("structured output is unavailable for this tokenizer: {e}"))?;
        let grammar = TopLevelGrammar::from_json_schema(constraint.schema());
        let matcher = Matcher::new(factory.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint {
            source: constraint.clone(),
            matcher,
        })
    }

    fn build_factory(&self, vocab: usize) -> Result<ParserFactory, String> {
        let mut tokenizer = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(self.tokenizer_json.as_bytes())
            .map_err(|e| e.to_string())?;
        let known = tokenizer.tokrx_info().vocab_size;
        let eos: Vec<u32> = self.eos_ids.iter().copied().filter(|&id| id < known).collect();
        if !eos.is_empty() {
            tokenizer.set_eos_tokens(&eos);
        }
        let env = tokenizer
            .into_tok_env(Some(vocab.max(known as usize)))
            .map_err(|e| e.to_string())?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    }
}

/// One request's grammar state.
pub struct Constraint {
    source: OutputConstraint,
    matcher: Matcher,
}

impl Clone for Constraint {
    /// An independent copy (llguidance's plain clone shares lexer state): each of a request's
    /// `n` choices follows its own output.
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("source", &self.source).finish()
    }
}

impl PartialEq for Constraint {
    /// Two constraints are equal when they enforce the same thing (not the same progress).
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Constraint {
    /// The tokens allowed next as bitmask words (bit `t % 32` of word `t / 32`); only the
    /// end-of-sequence tokens once the output is complete.
    pub fn allowed(&mut self) -> Result<Vec<u32>, String> {
        self.matcher
            .compute_mask_or_eos()
            .map(|mask| mask.as_slice().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Follows the chosen token; true once the output is complete.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}
