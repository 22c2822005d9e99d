//! Prefix caching and cancellation over real HTTP.

mod common;

use common::{engine_config, repo_model, TestServer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn system_prompt() -> String {
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park \
     with her friends. One day, she saw a big red ball near the tree. She ran to the ball and \
     picked it up. "
        .repeat(5)
}

async fn chat(s: &TestServer, user: &str) -> Value {
    let body = json!({
        "messages": [{"role": "system", "content": system_prompt()}, {"role": "user", "content": user}],
        "max_tokens": 24,
        "temperature": 0
    });
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_served_from_the_cache_with_identical_output() {
    let warm = TestServer::start(engine_config(&repo_model())).await;
    let mut cold_cfg = engine_config(&repo_model());
    cold_cfg.enable_prefix_cache = false;
    let cold = TestServer::start(cold_cfg).await;

    let first = chat(&warm, "Tell me about a dog.").await;
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert!(prompt_tokens >= 300, "system prompt is long: {prompt_tokens} tokens");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    for user in ["Tell me about a cat.", "What did Lily do next?"] {
        let hit = chat(&warm, user).await;
        let cached = hit["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached");
        assert!(cached >= 288, "most of the shared system prompt is cached: {cached}");
        let reference = chat(&cold, user).await;
        assert_eq!(reference["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            hit["choices"][0]["message"], reference["choices"][0]["message"],
            "{user}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reuses_all_but_its_last_token_with_identical_output() {
    let s = TestServer::start(engine_config(&repo_model())).await;
    let complete = |prompt: String| {
        let url = s.url("/v1/completions");
        async move {
            // 24 new tokens fill the block holding the prompt's last token, so it is cached.
            let body = json!({"prompt": prompt, "max_tokens": 24, "ignore_eos": true, "temperature": 0});
            let resp = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.expect("json")
        }
    };
    for words in [37, 64, 90] {
        let prompt = system_prompt().split(' ').take(words).collect::<Vec<_>>().join(" ");
        let first = complete(prompt.clone()).await;
        let again = complete(prompt).await;
        let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
        // Whole blocks are shared; the rest but the last token comes from the block the first
        // request left behind, taken over.
        assert_eq!(
            again["usage"]["prompt_tokens_details"]["cached_tokens"],
            prompt_tokens - 1,
            "{words} words"
        );
        assert_eq!(
            again["choices"][0]["text"], first["choices"][0]["text"],
            "{words} words"
        );
    }
    let (free, total) = s.wait_pool_all_free().await;
    assert_eq!(free, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_cancelled_at_random_points_leave_the_pool_all_free() {
    let s = TestServer::start(engine_config(&repo_model())).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(50);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = s.url("/v1/completions");
        let after_chunks = rng.random_range(0..20);
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("Story {i}: once"), "max_tokens": 300, "ignore_eos": true,
                              "temperature": 0.9, "seed": i, "stream": true});
            let mut resp = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request");
            for _ in 0..after_chunks {
                if resp.chunk().await.expect("chunk").is_none() {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let (free, total) = s.wait_pool_all_free().await;
    assert_eq!(free, total);
    let aborted = s.engine.stats().num_aborted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(aborted >= 40, "most streams were cancelled mid-way: {aborted}");
}
