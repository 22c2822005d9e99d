//! CPU-side text I/O: tokenizer and chat template (in), incremental detokenizer, stop
//! strings, and the reply parser that splits thoughts and tool calls out (out). Used by `server` on tokio workers; never touches the engine.

pub mod chat_template;
pub mod codec;
pub mod detokenizer;
pub mod gguf_tokenizer;
pub mod grammar;
pub mod reasoning;
pub mod reply;
pub mod rerank;
pub mod stop;
pub mod tools;

pub use chat_template::{ChatImage, ChatMessage, ChatPrompt, ChatTemplate, TemplateError};
pub use codec::TextCodec;
pub use detokenizer::IncrementalDetokenizer;
pub use grammar::{Constraint, GrammarCompiler, OutputConstraint};
pub use reply::{ReasoningMode, ReplyDelta, ReplyParser, ReplyPlan};
pub use stop::{StopMatcher, StopOutcome};
