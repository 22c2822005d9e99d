//! Output constraints (a JSON object, a JSON schema, a Lark grammar) compiled against the model's tokenizer
//! with llguidance, the grammar engine llama.cpp and vLLM use. A `Constraint` is one request's
//! matcher: it names the tokens that may come next (a bitmask the samplers apply before they
//! choose) and follows every token chosen, so the output always parses and validates.
//!
//! A grammar bounds what is valid, not how long it takes: a weak model can stay inside an
//! unbounded string until `max_tokens`. So when the budget runs low the mask narrows to the
//! allowed tokens that close JSON — inside a string a `"` (with closers after it), elsewhere
//! `}` / `]`, then `,` `:`, then nonzero digits, then the shortest literals — falling back to
//! the whole mask where none is allowed, so outputs end complete instead of cut.

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
    /// Text of a Lark grammar in llguidance's dialect (a forced tool call in the model's
    /// syntax, JSON inside it).
    Grammar(String),
}

impl OutputConstraint {
    /// What llguidance compiles. Schemas ask for compact JSON (no free whitespace between
    /// tokens, as OpenAI's structured outputs), which also keeps a weak model from padding.
    fn grammar(&self) -> TopLevelGrammar {
        let mut schema = match self {
            Self::JsonObject => json!({"type": "object"}),
            Self::JsonSchema(s) => s.clone(),
            Self::Grammar(lark) => return TopLevelGrammar::from_lark(lark.clone()),
        };
        if let Value::Object(map) = &mut schema {
            map.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        TopLevelGrammar::from_json_schema(schema)
    }
}

/// Builds constraints for one tokenizer. The token trie is made on first use: it takes a
/// moment for a 150k-token vocabulary, which requests without constraints never pay.
pub struct GrammarCompiler {
    tokenizer_json: String,
    eos_ids: Vec<u32>,
    compiled: OnceLock<Result<Compiled, String>>,
}

/// What a tokenizer's constraints share: the parser factory and the closing tiers.
type Compiled = (Arc<ParserFactory>, Arc<ClosingTiers>);

/// Bitmasks of the tokens that close JSON, strongest first (see the module comment), and each
/// token's bytes (to follow whether the output is inside a string).
#[derive(Debug)]
struct ClosingTiers {
    /// Inside a string: `"` followed only by `}`, `]`, `,`.
    in_string: Vec<u32>,
    /// Elsewhere: only `}`, `]` or end of sequence (a complete value, such as a number, may
    /// simply end); then `,`, `:` or spaces; then nonzero digits (a number that must still
    /// grow, such as `0.000…` under `exclusiveMinimum: 0`, ends soonest with one); then a
    /// shortest literal (`0`, `true`, `false`, `null`, `""`, `[]`, `{}`).
    outside: [Vec<u32>; 4],
    bytes: Vec<Vec<u8>>,
}

impl ClosingTiers {
    fn new(trie: &llguidance::toktrie::TokTrie) -> Self {
        let words = trie.vocab_size().div_ceil(32);
        let mut in_string = vec![0u32; words];
        let mut outside = [(); 4].map(|_| vec![0u32; words]);
        let mut all_bytes = Vec::with_capacity(trie.vocab_size());
        let eos = trie.eos_token_set();
        for t in 0..trie.vocab_size() as u32 {
            let bytes = trie.token(t).to_vec();
            let only = |b: &[u8], set: &[u8]| !b.is_empty() && b.iter().all(|c| set.contains(c));
            let literal = [&b"0"[..], b"true", b"false", b"null", b"\"\"", b"[]", b"{}"]
                .iter()
                .any(|l| !bytes.is_empty() && bytes.trim_ascii() == *l);
            let (word, bit) = ((t / 32) as usize, 1u32 << (t % 32));
            if bytes.first() == Some(&b'"') && bytes[1..].iter().all(|c| b"}],".contains(c)) {
                in_string[word] |= bit;
            }
            if only(&bytes, b"}]") || eos.is_allowed(t) {
                outside[0][word] |= bit;
            }
            if only(&bytes, b"}],: ") {
                outside[1][word] |= bit;
            }
            if only(&bytes, b"123456789") {
                outside[2][word] |= bit;
            }
            if literal {
                outside[3][word] |= bit;
            }
            all_bytes.push(bytes);
        }
        Self {
            in_string,
            outside,
            bytes: all_bytes,
        }
    }
}

/// llguidance's messages, without the parser-state dump that follows their first line.
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_string()
}

/// Tokens left below which a constrained output starts closing: half the budget, at least 64
/// (small vocabularies spell keys a character a token, and the keys a schema requires may all
/// still be to come). Outputs that end well within their budget never reach it.
fn closing_point(max_tokens: usize) -> usize {
    (max_tokens / 2).max(64)
}

/// Where the output stands in JSON's lexical structure.
#[derive(Clone, Copy, Debug, Default)]
struct JsonLexState {
    in_string: bool,
    escaped: bool,
}

impl JsonLexState {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.escaped {
                self.escaped = false;
            } else if self.in_string && b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = !self.in_string;
            }
        }
    }
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
            compiled: OnceLock::new(),
        }
    }

    /// A fresh matcher for `constraint` over a `vocab`-wide logits row, or why it cannot be
    /// enforced (an unsupported schema feature, a malformed schema).
    pub fn compile(&self, constraint: &OutputConstraint, vocab: usize) -> Result<Constraint, String> {
        let (factory, closing) = self
            .compiled
            .get_or_init(|| {
                let factory = self.build_factory(vocab)?;
                let closing = ClosingTiers::new(factory.tok_env().tok_trie());
                Ok((Arc::new(factory), Arc::new(closing)))
            })
            .as_ref()
            .map_err(|e| format!("structured output is unavailable for this tokenizer: {e}"))?;
        let mut matcher = Matcher::new(factory.create_parser(constraint.grammar()));
        if let Some(error) = matcher.get_error() {
            return Err(first_line(&error));
        }
        // Some schemas compile but cannot produce a first mask (a bare self-reference, tens of
        // thousands of alternatives): found here they are the client's 400, not a failed step.
        matcher.compute_mask().map_err(|e| first_line(&e.to_string()))?;
        Ok(Constraint {
            source: constraint.clone(),
            matcher,
            closing: closing.clone(),
            lex: JsonLexState::default(),
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
    closing: Arc<ClosingTiers>,
    lex: JsonLexState,
}

impl Clone for Constraint {
    /// An independent copy (llguidance's plain clone shares lexer state): each of a request's
    /// `n` choices follows its own output.
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            matcher: self.matcher.deep_clone(),
            closing: self.closing.clone(),
            lex: self.lex,
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
    /// end-of-sequence tokens once the output is complete. With `left` of `max_tokens` to go
    /// and the closing point reached, only the allowed tokens that close the output, where
    /// there are any.
    pub fn allowed(&mut self, left: usize, max_tokens: usize) -> Result<Vec<u32>, String> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| first_line(&e.to_string()))?;
        let mask = mask.as_slice();
        if left <= closing_point(max_tokens) {
            let tiers = match self.lex.in_string {
                true => std::slice::from_ref(&self.closing.in_string),
                false => &self.closing.outside[..],
            };
            for tier in tiers {
                let closing: Vec<u32> = mask.iter().zip(tier).map(|(m, c)| m & c).collect();
                if closing.iter().any(|&w| w != 0) {
                    return Ok(closing);
                }
            }
        }
        Ok(mask.to_vec())
    }

    /// Follows the chosen token; true once the output is complete.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))?;
        if let Some(bytes) = self.closing.bytes.get(token as usize) {
            self.lex.feed(bytes);
        }
        Ok(self.matcher.is_stopped())
    }
}
