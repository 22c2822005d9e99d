//! mlxd: a local LLM server speaking the OpenAI and Ollama HTTP APIs.
//!
//! `server` (async HTTP) → channels → `engine` (one OS thread owning the model, the KV memory
//! and the `scheduler`). `models` hold the model families, `text` the tokenizer side,
//! `catalog` the models that can be served, by name.

pub mod bench;
pub mod catalog;
pub mod compute;
pub mod config;
pub mod device;
pub mod engine;
pub mod formats;
pub mod models;
pub mod output;
pub mod request;
pub mod scheduler;
pub mod server;
pub mod text;
