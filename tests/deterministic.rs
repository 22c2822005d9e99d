//! `--deterministic` on the CPU: a request's tokens and logprobs are bit for bit the same
//! alone, among 7 or 63 other requests, after preemption, with a prefix-cache hit and on a
//! fresh engine, with the repository's real trained model (its greedy choices are not coin
//! flips, so a last-bit difference shows as a logprob, and sometimes a token); and what the
//! mode does not take is refused by name.

mod common;

use common::{codec, engine_config, repo_model, token_request};
use mlxd::engine::{EngineConfig, EngineHandle, GenerationStream, TokenEvent};
use mlxd::request::{SamplingParams, ValidatedRequest};
use std::sync::atomic::Ordering;

/// What a request produced, with every float as its bits: tokens, and per token the sampled
/// token's logprob and the top 5.
#[derive(Debug, PartialEq, Eq)]
struct Output {
    tokens: Vec<u32>,
    logprobs: Vec<(u32, Vec<(u32, u32)>)>,
    /// Prompt tokens served from the prefix cache.
    cached: u32,
}

async fn output_of(mut stream: GenerationStream) -> Output {
    let mut out = Output {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        cached: 0,
    };
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Scheduled { cached_tokens } => out.cached = cached_tokens,
            TokenEvent::Token { id, logprobs } => {
                out.tokens.push(id);
                out.logprobs.extend(logprobs.map(|l| {
                    (
                        l.logprob.to_bits(),
                        l.top.iter().map(|t| (t.id, t.logprob.to_bits())).collect(),
                    )
                }));
            }
            TokenEvent::Finished { .. } => break,
            TokenEvent::Error(e) => panic!("engine error: {e}"),
            TokenEvent::PromptLogprobs { .. } | TokenEvent::Embedding(_) => {}
        }
    }
    out
}

/// The engine settings of these tests: the repository's model in deterministic mode on the
/// CPU (a GPU's run is tests/gpu/check_deterministic.py), room for 64 sequences.
fn deterministic_config() -> EngineConfig {
    let mut cfg = engine_config(&repo_model());
    cfg.device = mlxd::device::DeviceChoice::Cpu;
    cfg.deterministic = true;
    cfg.max_num_seqs = Some(64);
    cfg
}

fn request(engine: &EngineHandle, prompt: &[u32], params: SamplingParams, max_tokens: u32) -> ValidatedRequest {
    token_request(engine, &codec(&repo_model()), prompt.to_vec(), params, max_tokens, &[2]).expect("valid request")
}

/// Greedy and seeded temperature-1 sampling, both with logprobs.
fn settings() -> [SamplingParams; 2] {
    let logprobs = Some(5);
    [
        SamplingParams {
            logprobs,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 1.0,
            seed: Some(77),
            logprobs,
            ..SamplingParams::default()
        },
    ]
}

/// Prompts of the model's stories, long enough to fill KV blocks (so a repeat hits the prefix
/// cache) and of different lengths.
fn prompts() -> Vec<Vec<u32>> {
    let codec = codec(&repo_model());
    [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine with her dog",
        "One day, a little boy named Tim found a big red ball in his garden. He wanted to show it to his mom, so he",
        "The sun was shining and the birds were singing. Mom said it was a good day to go to the park and",
    ]
    .iter()
    .map(|t| codec.encode(t, true).expect("encodes"))
    .collect()
}

/// Requests `ids` of other lengths and settings, to run beside the ones compared.
fn others(engine: &EngineHandle, ids: std::ops::Range<usize>) -> Vec<GenerationStream> {
    let codec = codec(&repo_model());
    ids.map(|i| {
        let text = format!("{} {i}", "The cat sat on the mat and".repeat(1 + i % 5));
        let prompt = codec.encode(&text, true).expect("encodes");
        let params = SamplingParams {
            temperature: 0.5 + (i % 4) as f32 * 0.2,
            seed: Some(i as u64),
            logprobs: (i % 2 == 0).then_some(3),
            ..SamplingParams::default()
        };
        engine
            .submit(request(engine, &prompt, params, 20 + (i % 7) as u32 * 10))
            .expect("submit")
    })
    .collect()
}

/// Every prompt under every setting, one at a time, on a fresh engine without a prefix cache.
async fn alone(max_tokens: u32) -> Vec<Output> {
    let mut cfg = deterministic_config();
    cfg.enable_prefix_cache = false;
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let mut outputs = Vec::new();
    for prompt in prompts() {
        for params in settings() {
            let stream = engine
                .submit(request(&engine, &prompt, params, max_tokens))
                .expect("submit");
            outputs.push(output_of(stream).await);
        }
    }
    outputs
}

/// Every prompt under every setting at once, beside `n` other requests, on `engine`.
async fn among_others(engine: &EngineHandle, n: usize, max_tokens: u32) -> Vec<Output> {
    let mut compared = Vec::new();
    let mut noise = Vec::new();
    for (k, prompt) in prompts().iter().enumerate() {
        // A third of the others arrive before each prompt's requests, so these join steps at
        // different points of the others' prefills and decodes.
        noise.extend(others(engine, n * k / 3..n * (k + 1) / 3));
        for params in settings() {
            compared.push(
                engine
                    .submit(request(engine, prompt, params, max_tokens))
                    .expect("submit"),
            );
        }
    }
    let (outputs, _) = futures::join!(
        futures::future::join_all(compared.into_iter().map(output_of)),
        futures::future::join_all(noise.into_iter().map(output_of))
    );
    outputs
}

fn assert_same(got: &[Output], want: &[Output], case: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.tokens, w.tokens, "{case}: request {i}'s tokens");
        assert_eq!(g.logprobs, w.logprobs, "{case}: request {i}'s logprobs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_bit_identical_alone_among_others_and_from_the_prefix_cache() {
    let want = alone(48).await;
    assert!(
        want.iter()
            .all(|o| o.tokens.len() > 8 && o.logprobs.len() == o.tokens.len()),
        "the requests generate, with logprobs"
    );
    // A second engine: the comparisons below also span a restart.
    let (engine, _join) = EngineHandle::spawn(deterministic_config()).expect("engine");
    for n in [7, 63] {
        let got = among_others(&engine, n, 48).await;
        assert_same(&got, &want, &format!("among {n} others"));
        assert!(
            engine.stats().peak_batch_seqs.load(Ordering::Relaxed) >= n.min(32),
            "requests ran together"
        );
    }
    // The engine has cached these prompts' blocks: the same requests again start from them.
    let again = among_others(&engine, 0, 48).await;
    let cached: Vec<u32> = again.iter().map(|o| o.cached).collect();
    assert!(cached.iter().all(|&c| c >= 16), "prefix hits: {cached:?}");
    assert_same(&again, &want, "from the prefix cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_bit_identical_after_preemption() {
    let want = alone(64).await;
    let mut cfg = deterministic_config();
    // 32 blocks of 16 tokens (1280 bytes per token): the 6 compared requests and 12 others
    // need about 100.
    cfg.kv_memory_bytes = Some(32 * 16 * 1280);
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let got = among_others(&engine, 12, 64).await;
    assert!(
        engine.stats().num_preemptions.load(Ordering::Relaxed) > 0,
        "the pool was too small for all"
    );
    assert_same(&got, &want, "after preemption");
}

#[test]
fn half_compute_on_the_cpu_is_refused_by_name() {
    let mut cfg = deterministic_config();
    cfg.dtype = Some(candle_core::DType::BF16);
    let Err(err) = EngineHandle::spawn(cfg) else {
        panic!("bf16 compute loaded in deterministic mode");
    };
    let err = err.to_string();
    assert!(err.contains("--deterministic") && err.contains("f32"), "{err}");
}
