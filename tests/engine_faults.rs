//! [INV_STEP_ISOLATION]: a step that fails (an error or a panic in the forward pass) fails only
//! its own requests, frees their KV blocks, and the engine serves the next request; over HTTP
//! both APIs answer in their own error shape and `/health` stays 200.

mod common;

use std::sync::atomic::Ordering;

use candle_core::Tensor;
use common::{codec, engine_config, repo_model, shared, token_request, TestServer};
use mlxd::compute::batch::BatchInput;
use mlxd::compute::paged_kv::PagedKvCache;
use mlxd::engine::{EngineHandle, ModelLoader, TokenEvent};
use mlxd::models::{Model, ModelConfig};
use mlxd::request::SamplingParams;
use serde_json::json;

/// A token id that makes the faulty model panic when it is fed.
const PANIC_TOKEN: u32 = 400;
/// A token id that makes the faulty model return an error when it is fed.
const ERROR_TOKEN: u32 = 401;

/// The repository's model, failing on the two poison tokens.
struct FaultyModel(Box<dyn Model>);

impl Model for FaultyModel {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn forward(&self, batch: &BatchInput, kv: &mut PagedKvCache) -> candle_core::Result<Tensor> {
        let tokens = batch.token_ids.to_vec1::<u32>()?;
        if tokens.contains(&PANIC_TOKEN) {
            panic!("injected fault: token {PANIC_TOKEN} in the batch");
        }
        if tokens.contains(&ERROR_TOKEN) {
            return Err(candle_core::Error::Msg("injected fault: forward failed".into()));
        }
        self.0.forward(batch, kv)
    }
}

fn faulty_loader() -> ModelLoader {
    Box::new(|cfg, device| {
        let model = mlxd::models::load(
            &cfg.model_path,
            None,
            device,
            cfg.dtype.unwrap_or(candle_core::DType::F32),
            mlxd::compute::Numerics::Fastest,
            &mlxd::formats::LoadProgress::hidden(),
        )
        .map_err(|e| mlxd::engine::EngineError::Load(e.to_string()))?;
        Ok(Box::new(FaultyModel(model)) as Box<dyn Model>)
    })
}

async fn outcome(engine: &EngineHandle, prompt: Vec<u32>) -> Result<usize, String> {
    let request =
        token_request(engine, &codec(&repo_model()), prompt, SamplingParams::greedy(), 8, &[]).expect("valid request");
    let mut stream = engine.submit(request).expect("submit");
    let mut n = 0;
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Token { .. } => n += 1,
            TokenEvent::Finished { .. } => return Ok(n),
            TokenEvent::Error(e) => return Err(e.to_string()),
            TokenEvent::Scheduled { .. } | TokenEvent::Embedding(_) | TokenEvent::PromptLogprobs { .. } => {}
        }
    }
    Err("stream closed".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_only_its_requests_and_the_engine_goes_on() {
    let (engine, _join) = EngineHandle::spawn_with(engine_config(&repo_model()), faulty_loader()).expect("engine");
    let stats = engine.stats();
    for poison in [PANIC_TOKEN, ERROR_TOKEN] {
        let failed = outcome(&engine, vec![1, 5, poison, 7]).await;
        let err = failed.expect_err("the poisoned request fails");
        assert!(err.contains("injected fault"), "{err}");
        assert_eq!(
            outcome(&engine, vec![1, 5, 6, 7]).await,
            Ok(8),
            "the next request is served"
        );
    }
    assert_eq!(stats.num_failed_steps.load(Ordering::Relaxed), 2);
    assert!(engine.is_healthy());
    // Every block is free once idle (the stats are published after each step).
    let total = stats.kv_blocks_total.load(Ordering::Relaxed);
    for _ in 0..100 {
        if stats.kv_blocks_free.load(Ordering::Relaxed) == total {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(stats.kv_blocks_free.load(Ordering::Relaxed), total, "no block leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_other_steps_survive_a_failing_one() {
    let (engine, _join) = EngineHandle::spawn_with(engine_config(&repo_model()), faulty_loader()).expect("engine");
    let codec = codec(&repo_model());
    let long = token_request(&engine, &codec, vec![1, 5, 6], SamplingParams::greedy(), 200, &[]).expect("valid");
    let mut running = engine.submit(long).expect("submit");
    // Wait until the long request decodes, then poison a step of its own.
    while !matches!(running.recv().await, Some(TokenEvent::Token { .. })) {}
    assert!(outcome(&engine, vec![1, PANIC_TOKEN]).await.is_err());
    // The long request shared that step and failed with it; later ones run normally.
    let mut saw_error = false;
    while let Some(ev) = running.recv().await {
        if let TokenEvent::Error(_) = ev {
            saw_error = true;
        }
    }
    assert!(saw_error, "a request batched with the failing step fails with it");
    assert_eq!(outcome(&engine, vec![1, 9, 10]).await, Ok(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_failed_step_is_a_500_in_each_api_shape_and_the_server_stays_up() {
    let s = TestServer::start_with_loader(engine_config(&repo_model()), faulty_loader()).await;
    let poisoned = json!({"model": "stories260k", "prompt": [1, 5, PANIC_TOKEN], "max_tokens": 4});
    let (status, body) = s.post_json("/v1/completions", poisoned).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("injected fault"),
        "{body}"
    );
    let ollama = json!({"model": "stories260k", "prompt": "", "context": [1, 5, ERROR_TOKEN], "stream": false});
    let (status, body) = s.post_json("/api/generate", ollama).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("injected fault"),
        "{body}"
    );
    let fine = json!({"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0});
    let (status, body) = s.post_json("/v1/completions", fine).await;
    assert_eq!(status, 200, "{body}");
    let health = reqwest::get(s.url("/health")).await.expect("health");
    assert_eq!(health.status(), 200);
    assert_eq!(s.wait_pool_all_free().await.0, s.wait_pool_all_free().await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_failed_step_ends_a_responses_stream_with_response_failed() {
    // The Qwen3 fixture's tokenizer reads "ny" as token 400: the user turn poisons the prefill.
    let s = TestServer::start_with_loader(engine_config(&shared("fixtures/qwen3/f32")), faulty_loader()).await;
    let body = json!({"input": "ny", "max_output_tokens": 4, "stream": true});
    let resp = s.send_json("/v1/responses", body.clone()).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    let events: Vec<serde_json::Value> = text
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds,
        ["response.created", "response.in_progress", "response.failed"],
        "{text}"
    );
    let failed = &events[2]["response"];
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("injected fault"),
        "{failed}"
    );
    // Whole, it is a 500 in OpenAI's shape; the server serves on.
    let mut whole = body;
    whole["stream"] = json!(false);
    let (status, body) = s.post_json("/v1/responses", whole).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    let (status, body) = s
        .post_json(
            "/v1/responses",
            json!({"input": "hello", "max_output_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "incomplete");
    // A failed response is not stored: nothing to continue.
    let id = failed["id"].as_str().expect("id");
    let stored = reqwest::get(s.url(&format!("/v1/responses/{id}"))).await.expect("get");
    assert_eq!(stored.status(), 404);
    assert_eq!(s.wait_pool_all_free().await.0, s.wait_pool_all_free().await.1);
}
