//! Admission limits, queue timeout and the Prometheus endpoint over real HTTP.

mod common;

use std::time::Duration;

use common::{engine_config, repo_model, TestServer};
use serde_json::{json, Value};

fn long_stream() -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": true, "stream": true})
}

async fn open_stream(s: &TestServer) -> reqwest::Response {
    let mut resp = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&long_stream())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    resp.chunk().await.expect("first chunk");
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_running_plus_queue_requests_get_429_at_once() {
    let mut cfg = engine_config(&repo_model());
    cfg.max_num_seqs = Some(1);
    // One running + one queued; every request below takes hundreds of engine steps.
    let s = TestServer::start_with_admission(cfg, 2).await;
    let client = reqwest::Client::new();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": true});
    let requests = (0..12).map(|_| {
        let req = client.post(s.url("/v1/completions")).json(&body);
        async move {
            let started = std::time::Instant::now();
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            let body: Value = resp.json().await.expect("json");
            (status, retry_after, body, started.elapsed())
        }
    });
    let results = futures::future::join_all(requests).await;
    let mut rejected = 0;
    for (status, retry_after, body, elapsed) in &results {
        match status {
            200 => assert_eq!(body["usage"]["completion_tokens"], 450),
            429 => {
                rejected += 1;
                assert_eq!(retry_after.as_ref().expect("Retry-After"), "1");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                assert!(*elapsed < Duration::from_secs(2), "rejected immediately");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        rejected >= 6,
        "with 2 slots most of 12 simultaneous requests are rejected: {rejected}"
    );
    assert!(results.len() - rejected >= 2);
    assert_eq!(reqwest::get(s.url("/health")).await.expect("health").status(), 200);
    let resp = client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Hi", "max_tokens": 3}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "slots are released when requests end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_past_the_timeout_gets_a_clear_error() {
    let mut cfg = engine_config(&repo_model());
    cfg.max_num_seqs = Some(1);
    cfg.queue_timeout = Some(Duration::from_millis(5));
    let s = TestServer::start(cfg).await;
    let _running = open_stream(&s).await;
    let resp = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Hi", "max_tokens": 3}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "queue_timeout");
    assert!(body["error"]["message"].as_str().expect("message").contains("queue"));
    // Streaming requests too get the status before any body byte, on both APIs.
    let client = reqwest::Client::new();
    let streamed = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 3, "stream": true}),
        ),
        ("/api/generate", json!({"model": "stories260k", "prompt": "Hi"})),
        (
            "/api/chat",
            json!({"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ];
    for (path, body) in streamed {
        let resp = client.post(s.url(path)).json(&body).send().await.expect("request");
        assert_eq!(resp.status(), 503, "{path}");
        assert_eq!(resp.headers()["retry-after"], "1", "{path}");
        let body: Value = resp.json().await.expect("a JSON error, not a stream");
        assert!(body["error"].to_string().contains("queue"), "{path}: {body}");
    }
}

/// Value of the first sample line starting with `name` (`name{labels} value` or `name value`),
/// read past the `model` label every sample carries.
fn sample(text: &str, name: &str) -> f64 {
    let text = text
        .replace("{model=\"stories260k\"}", "")
        .replace("model=\"stories260k\",", "");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload() {
    let s = TestServer::start(engine_config(&repo_model())).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let resp = client
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": true, "temperature": 0}))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
    }
    // A stop string matched by the text stage finishes the sequence in the engine with `stop`.
    let resp = client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true,
                      "temperature": 0, "stop": "Lily"}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    s.wait_pool_all_free().await;
    let resp = reqwest::get(s.url("/metrics")).await.expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/plain"));
    let text = resp.text().await.expect("body");
    assert_eq!(sample(&text, "mlxd_prompt_tokens_total"), 20.0);
    assert_eq!(sample(&text, "mlxd_prefix_cache_queries_total"), 20.0);
    assert_eq!(
        sample(&text, "mlxd_prefix_cache_hits_total"),
        0.0,
        "5-token prompts fill no block"
    );
    assert!(sample(&text, "mlxd_generation_tokens_total") >= 38.0);
    assert_eq!(
        sample(&text, "mlxd_request_success_total{finished_reason=\"length\"}"),
        3.0
    );
    assert_eq!(
        sample(&text, "mlxd_request_success_total{finished_reason=\"stop\"}"),
        1.0
    );
    assert_eq!(sample(&text, "mlxd_time_to_first_token_seconds_count"), 4.0);
    assert_eq!(sample(&text, "mlxd_e2e_request_latency_seconds_count"), 4.0);
    assert!(sample(&text, "mlxd_inter_token_latency_seconds_count") >= 27.0);
    assert_eq!(sample(&text, "mlxd_num_requests_running"), 0.0);
    assert_eq!(sample(&text, "mlxd_num_requests_waiting"), 0.0);
    assert_eq!(sample(&text, "mlxd_kv_cache_blocks_used"), 0.0);
    assert_eq!(
        sample(&text, "mlxd_kv_cache_blocks_total"),
        s.engine.info().num_kv_blocks as f64
    );
    assert_eq!(sample(&text, "mlxd_kv_cache_usage_ratio"), 0.0);
    assert_eq!(sample(&text, "mlxd_num_preemptions_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_gauges_move_under_load_and_return_to_idle() {
    let mut cfg = engine_config(&repo_model());
    cfg.max_num_seqs = Some(2);
    let s = TestServer::start(cfg).await;
    let scrape = || async {
        let text = reqwest::get(s.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let get = |name: &str| sample(&text, name);
        (
            get("mlxd_num_requests_running"),
            get("mlxd_num_requests_waiting"),
            get("mlxd_kv_cache_usage_ratio"),
            text.clone(),
        )
    };
    // The KV cache's layout, as an endpoint picker reads it (vLLM's cache_config_info labels).
    let (_, _, _, text) = scrape().await;
    let layout = format!(
        "mlxd_cache_config_info{{model=\"stories260k\",block_size=\"16\",num_gpu_blocks=\"{}\",cache_dtype=\"f32\",enable_prefix_caching=\"true\"}} 1",
        s.engine.info().num_kv_blocks
    );
    assert!(text.lines().any(|l| l == layout), "{layout} in:\n{text}");
    // Four long streams on two running slots: two run, two wait, blocks fill.
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let url = s.url("/v1/completions");
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(url)
                    .json(&long_stream())
                    .send()
                    .await
                    .expect("request");
                resp.text().await.ok()
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut busiest = (0.0, 0.0, 0.0);
    while std::time::Instant::now() < deadline {
        let (running, waiting, usage, _) = scrape().await;
        assert!((0.0..=1.0).contains(&usage), "usage is a fraction: {usage}");
        busiest = (
            f64::max(busiest.0, running),
            f64::max(busiest.1, waiting),
            f64::max(busiest.2, usage),
        );
        if running == 2.0 && waiting == 2.0 && usage > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((busiest.0, busiest.1), (2.0, 2.0), "gauges under load: {busiest:?}");
    assert!(busiest.2 > 0.0, "KV in use under load: {busiest:?}");
    // The clients leave: every gauge returns to idle.
    for stream in &streams {
        stream.abort();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (running, waiting, usage, _) = scrape().await;
        if (running, waiting, usage) == (0.0, 0.0, 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still busy: {running} {waiting} {usage}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
