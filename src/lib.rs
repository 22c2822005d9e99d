//! mlxd: a local LLM server speaking the OpenAI and Ollama HTTP APIs.
//!
//! `server` (async HTTP) → channels → `engine` (one OS thread owning the model, the KV memory
//! and the `scheduler`). `models` hold what a model is (the families), `formats` how weight
//! files load, `compute` how each device computes the layers; `text` the tokenizer side,
//! `catalog` the models that can be served, by name. `docs/ARCHITECTURE.md` §1 has the layering.

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
