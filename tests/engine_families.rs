//! Every model family through the real engine: paged KV, chunked prefill, batching and prefix
//! reuse together must still reproduce the transformers greedy tokens.

mod common;

use std::path::PathBuf;

use common::{engine_config, ids, read_json, shared, token_request};
use mlxd::engine::{EngineHandle, TokenEvent};
use mlxd::request::SamplingParams;
use mlxd::text::TextCodec;

async fn greedy_tokens(engine: &EngineHandle, codec: &TextCodec, prompt: Vec<u32>, n: u32) -> Vec<u32> {
    // The references never stop at EOS.
    let request = token_request(engine, codec, prompt, SamplingParams::greedy(), n, &[]).expect("valid request");
    let mut stream = engine.submit(request).expect("submit");
    let mut out = Vec::new();
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Token { id, .. } => out.push(id),
            TokenEvent::Finished { .. } => break,
            TokenEvent::Error(e) => panic!("engine error: {e}"),
            TokenEvent::Scheduled { .. } | TokenEvent::Embedding(_) | TokenEvent::PromptLogprobs { .. } => {}
        }
    }
    out
}

/// All reference sequences at once, twice (the second round reuses cached prefixes), with a
/// tiny token budget so prompts are prefilled in chunks alongside decodes.
async fn check_family(model: PathBuf, refs: PathBuf) {
    let mut cfg = engine_config(&model);
    cfg.max_num_batched_tokens = Some(8);
    cfg.block_size = 4;
    cfg.max_model_len = Some(256);
    let codec = common::codec(&cfg.model_path);
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let refs = read_json(&refs);
    let steps = refs["greedy_steps"].as_u64().unwrap_or(32) as u32;
    let seqs: Vec<serde_json::Value> = refs["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .chain(refs["batch"]["members"].as_array().into_iter().flatten())
        .cloned()
        .collect();
    for round in 0..2 {
        let runs = seqs
            .iter()
            .map(|s| greedy_tokens(&engine, &codec, ids(&s["prompt_ids"]), steps));
        let outputs = futures::future::join_all(runs).await;
        for (s, out) in seqs.iter().zip(outputs) {
            assert_eq!(
                out,
                ids(&s["greedy_ids"]),
                "{} {} round {round}",
                model.display(),
                s["name"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_reproduces_transformers_through_the_engine() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi3-longrope"] {
        let refs = shared(&format!("fixtures/{arch}/refs/transformers-f32.json"));
        check_family(shared(&format!("fixtures/{arch}/f32")), refs).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixtures_of_experts_reproduce_transformers_through_the_engine() {
    for arch in ["qwen3_moe", "mixtral"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/moe")
            .join(arch);
        check_family(dir.join("f32"), dir.join("refs/transformers-f32.json")).await;
    }
}

/// Gemma 4's dense shape (layers reading shared KV, per-layer inputs, global layers with their
/// own head width: KV cache layers of two widths, fewer than the decoder's layers) and its
/// mixture-of-experts shape, with chunked prefill and prefix-cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma4_reproduces_transformers_through_the_engine() {
    for variant in ["dense", "moe"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/gemma4")
            .join(variant);
        check_family(dir.join("f32"), dir.join("refs/transformers-f32.json")).await;
    }
}
