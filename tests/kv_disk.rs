//! The prefix cache's disk tier, engine by engine: blocks written by one engine are read back by
//! the next one on the same directory (a restart), and outputs with disk hits equal the outputs
//! computed from scratch, for every fixture family; a corrupt block file, another model's
//! directory and blocks computed in another dtype are misses, never wrong output.

mod common;

use std::path::{Path, PathBuf};

use candle_core::DType;
use common::{codec, engine_config, read_json, shared, token_request};
use mlxd::engine::kv_disk::KvDiskConfig;
use mlxd::engine::{EngineConfig, EngineHandle, TokenEvent};
use mlxd::request::{SamplingParams, Usage};

/// A fresh directory for one test.
fn disk_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlxd-kv-disk-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A prompt of several full blocks: the fixture's reference sequences back to back.
fn long_prompt(arch: &str) -> Vec<u32> {
    let prompts = read_json(&shared(&format!("fixtures/{arch}/refs/prompts.json")));
    prompts["sequences"]
        .as_array()
        .into_iter()
        .chain(prompts["batch"].as_array())
        .flatten()
        .flat_map(|s| s["ids"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_u64().expect("id") as u32)
        .take(70)
        .collect()
}

/// The test engine settings for `model` with its disk tier in `dir`.
fn disk_config(model: &Path, dir: &Path) -> EngineConfig {
    let mut cfg = engine_config(model);
    cfg.kv_disk = Some(KvDiskConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
    });
    cfg
}

/// Greedy tokens and usage of one request on a fresh engine over `dir`, which is then shut
/// down (flushing the disk tier); also the engine's disk hits in tokens.
async fn run_once(model: &Path, dir: &Path, prompt: &[u32]) -> (Vec<u32>, Usage, f64) {
    run_with(disk_config(model, dir), prompt).await
}

/// `run_once` with any settings.
async fn run_with(cfg: EngineConfig, prompt: &[u32]) -> (Vec<u32>, Usage, f64) {
    let model = cfg.model_path.clone();
    let (engine, join) = EngineHandle::spawn(cfg).expect("engine");
    let request = token_request(
        &engine,
        &codec(&model),
        prompt.to_vec(),
        SamplingParams::greedy(),
        8,
        &[],
    )
    .expect("valid request");
    let mut stream = engine.submit(request).expect("submit");
    let (mut tokens, mut usage) = (Vec::new(), Usage::default());
    while let Some(event) = stream.recv().await {
        match event {
            TokenEvent::Token { id, .. } => tokens.push(id),
            TokenEvent::Finished { usage: u, .. } => {
                usage = u;
                break;
            }
            TokenEvent::Error(e) => panic!("engine error: {e}"),
            TokenEvent::Scheduled { .. } | TokenEvent::Embedding(_) | TokenEvent::PromptLogprobs { .. } => {}
        }
    }
    let hits = common::disk_hits(&engine);
    engine.shutdown();
    drop(engine);
    join.join().expect("engine thread");
    (tokens, usage, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_engines_read_their_prefix_back_and_answer_the_same() {
    for arch in ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "phi3-longrope"] {
        let model = shared(&format!("fixtures/{arch}/f32"));
        let dir = disk_dir(arch);
        let prompt = long_prompt(arch);
        let full_blocks = (prompt.len() - 1) / 16 * 16;
        let (scratch, usage, hits) = run_once(&model, &dir, &prompt).await;
        assert_eq!(
            (usage.cached_tokens, hits),
            (0, 0.0),
            "{arch}: a fresh directory has nothing"
        );
        let (again, usage, hits) = run_once(&model, &dir, &prompt).await;
        assert_eq!(
            again, scratch,
            "{arch}: outputs with disk hits equal the outputs from scratch"
        );
        assert_eq!(
            usage.cached_tokens as usize, full_blocks,
            "{arch}: every full prompt block came back"
        );
        assert_eq!(hits as usize, full_blocks, "{arch}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_files_and_other_models_are_misses() {
    let model = shared("fixtures/qwen2/f32");
    let dir = disk_dir("corrupt");
    let prompt = long_prompt("qwen2");
    let (scratch, _, _) = run_once(&model, &dir, &prompt).await;
    // Flip one payload byte of the second block's file (block files are named by hash; the
    // second block is the one whose file was written second).
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("subdir").flatten().map(|f| f.path()))
        .collect();
    files.sort_by_key(|f| std::fs::metadata(f).and_then(|m| m.modified()).expect("mtime"));
    assert!(files.len() >= 3, "{files:?}");
    let mut bytes = std::fs::read(&files[1]).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&files[1], bytes).expect("corrupt");
    let (again, usage, hits) = run_once(&model, &dir, &prompt).await;
    assert_eq!(again, scratch, "a corrupt block is recomputed, never used");
    assert!(usage.cached_tokens < ((prompt.len() - 1) / 16 * 16) as u32, "{usage:?}");
    assert_eq!(hits as u32, usage.cached_tokens);
    // Another model on the same directory finds nothing of this one's.
    let other = shared("fixtures/llama/f32");
    let (_, usage, hits) = run_once(&other, &dir, &long_prompt("llama")).await;
    assert_eq!((usage.cached_tokens, hits), (0, 0.0));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_computed_in_another_dtype_are_misses() {
    // The same weights and the same f16 cache, computed in f32 and then in f16: the KV values
    // differ, so the second engine must not read the first one's blocks. (Only the CPU reads a
    // KV dtype other than its compute dtype.)
    if !common::test_device().is_cpu() {
        return;
    }
    let model = shared("fixtures/qwen2/f32");
    let dir = disk_dir("dtypes");
    let prompt = long_prompt("qwen2");
    let config = |dtype| {
        let mut cfg = disk_config(&model, &dir);
        cfg.dtype = Some(dtype);
        cfg.kv_dtype = Some(DType::F16);
        cfg
    };
    run_with(config(DType::F32), &prompt).await;
    let (_, usage, hits) = run_with(config(DType::F16), &prompt).await;
    assert_eq!((usage.cached_tokens, hits), (0, 0.0));
    // The first setting still finds its own.
    let (_, usage, _) = run_with(config(DType::F32), &prompt).await;
    assert_eq!(usage.cached_tokens as usize, (prompt.len() - 1) / 16 * 16);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
