//! CPU-side text I/O: tokenizer and chat template (in), incremental detokenizer and stop
//! strings (out). Used by `server` on tokio workers; never touches the engine.

pub mod chat_template;
pub mod codec;
pub mod detokenizer;
pub mod gguf_tokenizer;
pub mod grammar;
pub mod stop;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateError};
pub use codec::TextCodec;
pub use detokenizer::IncrementalDetokenizer;
pub use grammar::{Constraint, GrammarCompiler, OutputConstraint};
pub use stop::{StopMatcher, StopOutcome};
