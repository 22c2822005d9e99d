//! Shared test helpers: paths into ../shared, a direct model runner, an in-process server.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mlxd::compute::batch::BatchInput;
use mlxd::compute::paged_kv::{KvLayout, PagedKvCache};
use mlxd::compute::Numerics;
use mlxd::formats::LoadProgress;
use mlxd::models::{self, Model};

/// `../shared/<rel>` from the crate root.
pub fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

/// Reads a JSON file.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// JSON array of integers → ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// JSON array of numbers → f32s.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Largest absolute difference of two equal-length vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Asserts `run` against a reference of the same sequences: sequence `i` (named `names[i]`,
/// `label` naming the model in messages) chose `greedy[i]`, and the logits of its every step
/// are within `tol` of the reference's `<name>.step_logits` in `logits`.
pub fn assert_matches_reference(
    run: &GreedyRun,
    names: &[&str],
    greedy: &[Vec<u32>],
    logits: &std::collections::HashMap<String, candle_core::Tensor>,
    tol: f32,
    label: &str,
) {
    for (i, name) in names.iter().enumerate() {
        assert_eq!(run.tokens[i], greedy[i], "{label} {name}: greedy tokens");
        let want = logits[&format!("{name}.step_logits")]
            .to_vec2::<f32>()
            .expect("step logits");
        for (step, (got, want)) in run.step_logits[i].iter().zip(&want).enumerate() {
            let diff = max_abs_diff(got, want);
            assert!(diff < tol, "{label} {name} step {step}: logits differ by {diff}");
        }
    }
}

/// Drives a model directly (no engine): every sequence gets its own contiguous run of blocks.
pub struct ModelRunner {
    pub model: Box<dyn Model>,
    device: Device,
    kv: PagedKvCache,
    block_size: usize,
    blocks_per_seq: usize,
}

/// Per-step logits and greedy tokens of each sequence.
pub struct GreedyRun {
    /// `steps[seq][i]` = the logits token `i` was chosen from.
    pub step_logits: Vec<Vec<Vec<f32>>>,
    /// Greedy tokens per sequence.
    pub tokens: Vec<Vec<u32>>,
}

impl ModelRunner {
    pub fn load(dir: &std::path::Path, dtype: DType, max_seqs: usize, max_len: usize) -> Self {
        let device = test_device();
        let model =
            models::load(dir, None, &device, dtype, Numerics::Fastest, &LoadProgress::hidden()).expect("model loads");
        let c = model.config().clone();
        let block_size = 16;
        let blocks_per_seq = max_len.div_ceil(block_size);
        let layout = KvLayout {
            widths: c.kv_widths.clone(),
            block_size,
            dtype,
        };
        let kv = PagedKvCache::new(layout, 1 + max_seqs * blocks_per_seq, &device).expect("kv");
        Self {
            model,
            device,
            kv,
            block_size,
            blocks_per_seq,
        }
    }

    /// The same runner with a fresh KV cache of `dtype` (the model keeps its compute dtype).
    pub fn with_kv_dtype(mut self, dtype: DType) -> Self {
        let layout = KvLayout {
            dtype,
            ..self.kv.layout().clone()
        };
        self.kv = PagedKvCache::new(layout, self.kv.num_blocks(), &self.device).expect("kv");
        self
    }

    fn slot(&self, seq: usize, pos: usize) -> u32 {
        ((1 + seq * self.blocks_per_seq) * self.block_size + pos) as u32
    }

    /// One forward: `chunks[i] = (seq index, first position, tokens)`; returns the last-token
    /// logits of each chunk.
    pub fn forward(&mut self, chunks: &[(usize, usize, Vec<u32>)]) -> Vec<Vec<f32>> {
        let (mut toks, mut pos, mut slots, mut ctx, mut q_lens, mut kv_lens, mut rows) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for (seq, start, tokens) in chunks {
            for (i, &t) in tokens.iter().enumerate() {
                toks.push(t);
                pos.push((start + i) as u32);
                slots.push(self.slot(*seq, start + i));
            }
            let kv_len = start + tokens.len();
            ctx.extend((0..kv_len).map(|p| self.slot(*seq, p)));
            q_lens.push(tokens.len());
            kv_lens.push(kv_len);
            rows.push((toks.len() - 1) as u32);
        }
        let dev = self.device.clone();
        let t = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &dev).expect("tensor")
        };
        let batch = BatchInput {
            token_ids: t(toks),
            positions: t(pos),
            slot_mapping: t(slots),
            context_slots: t(ctx),
            q_lens,
            kv_lens,
            logits_rows: t(rows),
            fixed: None,
            images: None,
        };
        self.model
            .forward(&batch, &mut self.kv)
            .expect("forward")
            .to_vec2::<f32>()
            .expect("logits")
    }

    /// Logits at every step of all `prompts` together, each fed `followed[i]` (teacher
    /// forcing): `[seq][step]`, step 0 from the prompt, step i after `followed[i][..i]`.
    pub fn forced(&mut self, prompts: &[Vec<u32>], followed: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
        let mut steps = vec![Vec::new(); prompts.len()];
        let mut chunks: Vec<(usize, usize, Vec<u32>)> =
            prompts.iter().enumerate().map(|(i, p)| (i, 0, p.clone())).collect();
        let n = followed.iter().map(Vec::len).min().unwrap_or(0);
        for step in 0..n {
            for ((i, row), fed) in self.forward(&chunks).into_iter().enumerate().zip(followed) {
                steps[i].push(row);
                chunks[i] = (i, prompts[i].len() + step, vec![fed[step]]);
            }
        }
        steps
    }

    /// Greedy decoding of all `prompts` together in one batch per step.
    pub fn greedy(&mut self, prompts: &[Vec<u32>], steps: usize) -> GreedyRun {
        let mut run = GreedyRun {
            step_logits: vec![Vec::new(); prompts.len()],
            tokens: vec![Vec::new(); prompts.len()],
        };
        let mut chunks: Vec<(usize, usize, Vec<u32>)> =
            prompts.iter().enumerate().map(|(i, p)| (i, 0, p.clone())).collect();
        for _ in 0..steps {
            let logits = self.forward(&chunks);
            for (i, row) in logits.into_iter().enumerate() {
                let next = mlxd::engine::sampler::argmax(&row);
                run.step_logits[i].push(row);
                run.tokens[i].push(next);
                chunks[i] = (i, prompts[i].len() + run.tokens[i].len() - 1, vec![next]);
            }
        }
        run
    }
}

/// A token-id request validated the one way every API validates, for `engine`'s model; `eos`
/// are the ids that end it.
pub fn token_request(
    engine: &mlxd::engine::EngineHandle,
    codec: &mlxd::text::TextCodec,
    prompt: Vec<u32>,
    params: mlxd::request::SamplingParams,
    max_tokens: u32,
    eos: &[u32],
) -> Result<mlxd::request::ValidatedRequest, mlxd::request::RequestError> {
    let mut spec = mlxd::request::GenerationSpec::new(mlxd::request::Prompt::Tokens(prompt));
    spec.sampling = params;
    spec.max_tokens = mlxd::request::MaxTokens::Exactly(max_tokens);
    let mut limits = engine.info().request_limits("test", codec);
    limits.eos_token_ids = eos.to_vec();
    mlxd::request::validate(spec, codec, &limits)
}

/// The tokenizer side of a model folder.
pub fn codec(model: &std::path::Path) -> mlxd::text::TextCodec {
    mlxd::text::TextCodec::open(model, &[]).expect("codec")
}

/// The device tests run on: `MLXD_TEST_DEVICE` (cpu, cuda, cuda:N), the CPU by default.
pub fn test_device_choice() -> mlxd::device::DeviceChoice {
    std::env::var("MLXD_TEST_DEVICE")
        .ok()
        .map_or(mlxd::device::DeviceChoice::Cpu, |d| {
            d.parse().expect("MLXD_TEST_DEVICE")
        })
}

/// The opened test device.
pub fn test_device() -> Device {
    test_device_choice().open().expect("test device")
}

/// Engine settings for tests: the repository's tiny model, small KV pool.
pub fn engine_config(model: &std::path::Path) -> mlxd::engine::EngineConfig {
    mlxd::engine::EngineConfig {
        model_path: model.to_path_buf(),
        mmproj: None,
        device: test_device_choice(),
        dtype: Some(DType::F32),
        kv_dtype: None,
        kv_memory_bytes: Some(64 << 20),
        gpu_memory_utilization: 0.9,
        block_size: 16,
        max_num_seqs: Some(16),
        max_num_batched_tokens: Some(2048),
        max_model_len: None,
        default_max_tokens: None,
        enable_prefix_cache: true,
        deterministic: false,
        cuda_graphs: true,
        show_progress: false,
        queue_timeout: None,
        kv_disk: None,
    }
}

/// A conversation of `turns` user/assistant exchanges of about 40 tokens each after a system
/// message: on the 512-token model, too long from about ten turns on.
pub fn long_conversation(turns: usize) -> Vec<serde_json::Value> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": "You tell short stories about a cat."})];
    for i in 0..turns {
        messages.push(serde_json::json!({"role": "user", "content": format!("Turn {i}: tell me what the cat did next in the big green park.")}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("In turn {i} the cat ran to the tree, climbed it and sat on a branch.")}));
    }
    messages.push(serde_json::json!({"role": "user", "content": "And then?"}));
    messages
}

/// The model folder shipped in the repository.
pub fn repo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/stories260k")
}

/// A server running in this process on a loopback port.
pub struct TestServer {
    pub base: String,
    pub engine: mlxd::engine::EngineHandle,
}

impl TestServer {
    /// Starts the engine and serves the router on 127.0.0.1 with an OS-chosen port.
    pub async fn start(cfg: mlxd::engine::EngineConfig) -> Self {
        Self::start_with_admission(cfg, 1024).await
    }

    /// Like `start`, admitting at most `admission_limit` concurrent requests.
    pub async fn start_with_admission(cfg: mlxd::engine::EngineConfig, admission_limit: usize) -> Self {
        let (engine, _join) = mlxd::engine::EngineHandle::spawn(cfg.clone()).expect("engine starts");
        Self::serve(engine, &cfg.model_path, admission_limit, Default::default(), |_| {}).await
    }

    /// Like `start`, with the model built by `loader` (fault injection).
    pub async fn start_with_loader(cfg: mlxd::engine::EngineConfig, loader: mlxd::engine::ModelLoader) -> Self {
        let (engine, _join) = mlxd::engine::EngineHandle::spawn_with(cfg.clone(), loader).expect("engine starts");
        Self::serve(engine, &cfg.model_path, 1024, Default::default(), |_| {}).await
    }

    /// Like `start`, with the router's HTTP options (keys, CORS, limits).
    pub async fn start_with_options(cfg: mlxd::engine::EngineConfig, options: mlxd::server::ServerOptions) -> Self {
        let (engine, _join) = mlxd::engine::EngineHandle::spawn(cfg.clone()).expect("engine starts");
        Self::serve(engine, &cfg.model_path, 1024, options, |_| {}).await
    }

    /// Like `start`, with the server's settings changed by `adjust` (`--strict-context`,
    /// `--no-ui`, ...).
    pub async fn start_adjusted(
        cfg: mlxd::engine::EngineConfig,
        adjust: impl FnOnce(&mut mlxd::server::AppState),
    ) -> Self {
        let (engine, _join) = mlxd::engine::EngineHandle::spawn(cfg.clone()).expect("engine starts");
        Self::serve(engine, &cfg.model_path, 1024, Default::default(), adjust).await
    }

    async fn serve(
        engine: mlxd::engine::EngineHandle,
        model: &std::path::Path,
        admission_limit: usize,
        options: mlxd::server::ServerOptions,
        adjust: impl FnOnce(&mut mlxd::server::AppState),
    ) -> Self {
        let codec = mlxd::text::TextCodec::open(model, &engine.info().model.eos_token_ids).expect("codec");
        let mut state = mlxd::server::AppState::new(
            engine.clone(),
            std::sync::Arc::new(codec),
            "stories260k".into(),
            admission_limit,
        );
        adjust(&mut state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            mlxd::server::serve(
                listener,
                mlxd::server::router(state, &options),
                std::future::pending(),
                mlxd::server::ConnectionTimeouts::default(),
            )
            .await
            .expect("serve");
        });
        Self {
            base: format!("http://{addr}"),
            engine,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON; the response as it came.
    pub async fn send_json(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// POSTs `body` as JSON; the status and the JSON answer.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self.send_json(path, body).await;
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json body"))
    }

    /// Waits (bounded) until every KV block is free again; returns the free count seen last.
    pub async fn wait_pool_all_free(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        let stats = self.engine.stats();
        let total = stats.kv_blocks_total.load(Ordering::Relaxed);
        let mut free = 0;
        for _ in 0..200 {
            free = stats.kv_blocks_free.load(Ordering::Relaxed);
            let busy = stats.num_running.load(Ordering::Relaxed) + stats.num_waiting.load(Ordering::Relaxed);
            if free == total && busy == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        (free, total)
    }
}

/// The model file or folder `model` follows llama.cpp's run in `refs` (a `llamacpp-<type>.json`
/// of tests/data/moe/make_gguf.py), every prompt batched together: greedy ids equal up to a
/// step where llama.cpp's own top-1/top-2 log-probability margin is below `tie` (0: exactly).
pub fn assert_follows_llama_cpp(refs: &std::path::Path, model: &std::path::Path, tie: f64, label: &str) {
    let json = read_json(refs);
    let seqs = json["sequences"].as_array().expect("sequences");
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let steps = seqs[0]["greedy_ids"].as_array().expect("greedy ids").len();
    let got = ModelRunner::load(model, DType::F32, prompts.len(), 128).greedy(&prompts, steps);
    for (i, seq) in seqs.iter().enumerate() {
        let want = ids(&seq["greedy_ids"]);
        if let Some(step) = got.tokens[i].iter().zip(&want).position(|(a, b)| a != b) {
            let margin = seq["llamacpp_top2_logit_margins"][step].as_f64();
            assert!(
                margin.is_some_and(|m| m < tie),
                "{label} sequence {i} parts from llama.cpp at step {step} (its margin {margin:?})\n got {:?}\nwant {want:?}",
                got.tokens[i]
            );
        }
    }
}

/// Loads `path` (with `mmproj` beside it) on the CPU in f32, for the error it gives.
pub fn load_error(path: &std::path::Path, mmproj: Option<&std::path::Path>) -> String {
    models::load(
        path,
        mmproj,
        &Device::Cpu,
        DType::F32,
        Numerics::Fastest,
        &LoadProgress::hidden(),
    )
    .err()
    .expect("load error")
    .to_string()
}

/// Prompt tokens `engine`'s disk tier has given back (`mlxd_kv_disk_hits_total`).
pub fn disk_hits(engine: &mlxd::engine::EngineHandle) -> f64 {
    engine
        .metrics()
        .render(engine.stats())
        .lines()
        .find_map(|l| l.strip_prefix("mlxd_kv_disk_hits_total "))
        .and_then(|v| v.parse().ok())
        .expect("disk hits metric")
}
