//! The engine thread end to end (no HTTP): continuous batching keeps results identical.

mod common;

use common::{codec, engine_config, ids, read_json, repo_model, shared, token_request};
use mlxd::engine::{EngineHandle, GenerationStream, TokenEvent};
use mlxd::request::{RequestError, SamplingParams, ValidatedRequest};
use std::sync::atomic::Ordering;

async fn tokens_of(mut stream: GenerationStream) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Token { id, .. } => out.push(id),
            TokenEvent::Scheduled { .. } | TokenEvent::Embedding(_) | TokenEvent::PromptLogprobs { .. } => {}
            TokenEvent::Finished { .. } => break,
            TokenEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    out
}

/// A request of the repository's model that stops at ids 1 and 2.
fn request(engine: &EngineHandle, prompt: Vec<u32>, params: SamplingParams, max_tokens: u32) -> ValidatedRequest {
    try_request(engine, prompt, params, max_tokens).expect("valid request")
}

fn try_request(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: u32,
) -> Result<ValidatedRequest, RequestError> {
    token_request(engine, &codec(&repo_model()), prompt, params, max_tokens, &[1, 2])
}

fn prompts() -> Vec<Vec<u32>> {
    let codec = mlxd::text::TextCodec::load(&repo_model(), &[]).expect("codec");
    [
        "Once upon a time",
        "Lily and Ben went to the park",
        "The cat",
        "One day, a little boy named Tim found a big red ball in his garden. He",
        "She",
        "The sun was shining and the birds were singing. Mom said",
        "A dog and a frog",
        "Tom had a toy car. He loved to play with it every day, and",
    ]
    .iter()
    .map(|t| codec.encode(t, true).expect("encodes"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_are_identical_alone_and_in_a_batch_of_8() {
    let (engine, _join) = EngineHandle::spawn(engine_config(&repo_model())).expect("engine");
    let prompts = prompts();
    let mut solo = Vec::new();
    for p in &prompts {
        let s = engine
            .submit(request(&engine, p.clone(), SamplingParams::greedy(), 48))
            .expect("submit");
        solo.push(tokens_of(s).await);
    }
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(request(&engine, p.clone(), SamplingParams::greedy(), 48))
                .expect("submit")
        })
        .collect();
    let batched = futures::future::join_all(streams.into_iter().map(tokens_of)).await;
    assert_eq!(batched, solo);
    assert!(
        engine.stats().peak_batch_seqs.load(Ordering::Relaxed) >= 4,
        "requests were decoded together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_reproduces_the_reference_generation() {
    let (engine, _join) = EngineHandle::spawn(engine_config(&repo_model())).expect("engine");
    let reference = read_json(&shared("models/stories260k/reference.json"));
    for g in reference["generations"].as_array().expect("generations") {
        let s = engine
            .submit(request(&engine, ids(&g["prompt_ids"]), SamplingParams::greedy(), 64))
            .expect("submit");
        assert_eq!(tokens_of(s).await, ids(&g["generated_ids"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_gives_same_tokens_whatever_else_is_batched() {
    let (engine, _join) = EngineHandle::spawn(engine_config(&repo_model())).expect("engine");
    let prompts = prompts();
    let seeded = SamplingParams {
        temperature: 1.0,
        seed: Some(1234),
        ..SamplingParams::default()
    };
    let alone = tokens_of(
        engine
            .submit(request(&engine, prompts[0].clone(), seeded.clone(), 40))
            .expect("submit"),
    )
    .await;
    let noise: Vec<_> = prompts[1..]
        .iter()
        .map(|p| {
            let params = SamplingParams {
                temperature: 0.8,
                ..SamplingParams::default()
            };
            engine.submit(request(&engine, p.clone(), params, 40)).expect("submit")
        })
        .collect();
    let again = engine
        .submit(request(&engine, prompts[0].clone(), seeded, 40))
        .expect("submit");
    let (again, _) = futures::join!(
        tokens_of(again),
        futures::future::join_all(noise.into_iter().map(tokens_of))
    );
    assert_eq!(again, alone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_pool_is_refused_before_the_engine() {
    let mut cfg = engine_config(&repo_model());
    cfg.kv_memory_bytes = Some(4 * 16 * 1280); // 4 blocks of 16 tokens (1280 bytes per token)
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let refused = try_request(&engine, vec![1; 40], SamplingParams::greedy(), 100);
    // 4 blocks of memory, one of them the null block.
    assert_eq!(refused, Err(RequestError::TooLargeForKvPool { needed: 9, total: 3 }));
    assert!(engine.is_healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_long_requests_in_a_tiny_pool_all_finish_exactly_as_alone() {
    let prompts = prompts();
    let requests: Vec<Vec<u32>> = (0..16).map(|i| prompts[i % prompts.len()].clone()).collect();
    let solo_engine = EngineHandle::spawn(engine_config(&repo_model())).expect("engine").0;
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(
            tokens_of(
                solo_engine
                    .submit(request(&solo_engine, p.clone(), SamplingParams::greedy(), 160))
                    .expect("submit"),
            )
            .await,
        );
    }
    let mut cfg = engine_config(&repo_model());
    cfg.kv_memory_bytes = Some(40 * 16 * 1280); // 40 blocks of 16 tokens; each request needs up to 12
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let streams: Vec<_> = requests
        .iter()
        .map(|p| {
            engine
                .submit(request(&engine, p.clone(), SamplingParams::greedy(), 160))
                .expect("submit")
        })
        .collect();
    let outputs = futures::future::join_all(streams.into_iter().map(tokens_of)).await;
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out, &solo[i % prompts.len()], "request {i}");
    }
    let stats = engine.stats();
    assert!(
        stats.num_preemptions.load(Ordering::Relaxed) > 0,
        "the pool was too small for all"
    );
    wait_until_idle(&engine).await;
    assert_eq!(
        stats.kv_blocks_free.load(Ordering::Relaxed),
        stats.kv_blocks_total.load(Ordering::Relaxed)
    );
}

async fn wait_until_idle(engine: &EngineHandle) {
    let s = engine.stats();
    for _ in 0..200 {
        if s.num_running.load(Ordering::Relaxed) + s.num_waiting.load(Ordering::Relaxed) == 0
            && s.kv_blocks_free.load(Ordering::Relaxed) == s.kv_blocks_total.load(Ordering::Relaxed)
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_streams_keep_receiving_tokens_while_a_long_prompt_is_prefilled() {
    let mut cfg = engine_config(&repo_model());
    cfg.max_num_batched_tokens = Some(32);
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let mut running = engine
        .submit(
            token_request(
                &engine,
                &codec(&repo_model()),
                vec![1, 403],
                SamplingParams::greedy(),
                500,
                &[],
            )
            .expect("valid request"),
        )
        .expect("submit");
    // Wait until the first stream is decoding.
    loop {
        if let Some(TokenEvent::Token { .. }) = running.recv().await {
            break;
        }
    }
    // Drop tokens already buffered so only those produced during the prefill are counted.
    while let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::ZERO, running.recv()).await {}
    let long_prompt: Vec<u32> = (0..400).map(|i| 3 + (i * 7) % 500).collect();
    let mut long = engine
        .submit(request(&engine, long_prompt, SamplingParams::greedy(), 4))
        .expect("submit");
    let mut tokens_during_prefill = 0;
    loop {
        tokio::select! {
            biased;
            ev = long.recv() => if let Some(TokenEvent::Token { .. }) = ev { break },
            ev = running.recv() => if let Some(TokenEvent::Token { .. }) = ev { tokens_during_prefill += 1 },
        }
    }
    // 400 prompt tokens in chunks of at most 31 (one budget slot is the decode token): 13 steps.
    assert!(
        tokens_during_prefill >= 10,
        "the running stream got {tokens_during_prefill} tokens while the long prompt was prefilled"
    );
}

#[test]
fn the_kv_cache_dtype_follows_the_weights_on_the_cpu_and_can_be_set() {
    use candle_core::DType;
    let info = |cfg| {
        let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
        let info = engine.info().clone();
        engine.shutdown();
        info
    };
    let q8 = shared("fixtures/gguf/stories260k-q8_0.gguf");
    let engine_config = |model: &std::path::Path| {
        let mut cfg = engine_config(model);
        cfg.kv_memory_bytes = Some(1 << 20); // fewer blocks than the sequences could use
        cfg
    };
    let cpu = common::test_device().is_cpu();
    // f32 weights keep f32 KV; quantized weights computed in f32 on the CPU keep f16 KV.
    assert_eq!(info(engine_config(&repo_model())).kv_dtype, DType::F32);
    let auto = info(engine_config(&q8));
    assert_eq!(auto.kv_dtype, if cpu { DType::F16 } else { DType::F32 });
    let mut asked = engine_config(&q8);
    asked.kv_dtype = Some(DType::F32);
    let f32_kv = info(asked);
    assert_eq!(f32_kv.kv_dtype, DType::F32);
    if cpu {
        // Same budget, blocks of half the bytes.
        assert_eq!(auto.num_kv_blocks + 1, 2 * (f32_kv.num_kv_blocks + 1));
    }
    // Half compute cannot read KV of another dtype (GGUF files always compute in f32).
    let mut mismatched = engine_config(&repo_model());
    mismatched.dtype = Some(DType::F16);
    mismatched.kv_dtype = Some(DType::F32);
    let Err(err) = EngineHandle::spawn(mismatched) else {
        panic!("f16 compute over an f32 cache loaded");
    };
    assert!(err.to_string().contains("KV dtype F32"), "{err}");
}
