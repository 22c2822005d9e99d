//! One front door over real HTTP: every request goes through the one validation step, so the
//! requests that once reached the engine unchecked are refused (or served) the same way on
//! both APIs, unknown fields are named, and the OpenAI extras (n, prompt lists, echo,
//! logit_bias, in-context logprob texts) work.

mod common;

use common::{engine_config, repo_model, TestServer};
use serde_json::{json, Value};

async fn server() -> TestServer {
    TestServer::start(engine_config(&repo_model())).await
}

/// Every SSE `data:` payload of a streamed request.
async fn post_sse(s: &TestServer, path: &str, body: Value) -> Vec<String> {
    let resp = s.send_json(path, body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    text.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_that_once_killed_the_engine_is_a_load_reply_and_the_server_stays_up() {
    let s = server().await;
    let crash = json!({"model": "stories260k", "prompt": "", "context": [], "raw": true});
    let (status, body) = s.post_json("/api/generate", crash).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["done"], true);
    assert_eq!(body["done_reason"], "load");
    // An empty prompt that continues a context generates from it.
    let resume = json!({"model": "stories260k", "prompt": "", "context": [1, 403, 200], "raw": true,
                        "stream": false, "options": {"temperature": 0, "num_predict": 4}});
    let (status, body) = s.post_json("/api/generate", resume).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["eval_count"], 4);
    assert_eq!(body["prompt_eval_count"], 3);
    let (status, _) = s.post_json("/v1/completions", completion(json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(reqwest::get(s.url("/health")).await.expect("health").status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prompts_are_refused_the_same_way_on_both_apis() {
    let s = server().await;
    let (status, body) = s.post_json("/v1/completions", completion(json!({"prompt": []}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt");
    assert!(
        body["error"]["message"].as_str().expect("message").contains("empty"),
        "{body}"
    );
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"prompt": [[1, 2], []]})))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"prompt": [1, 999999]})))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().expect("message").contains("999999"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_that_do_not_work_are_named_not_ignored() {
    let s = server().await;
    let cases = [
        (completion(json!({"frobnicate": 1})), "frobnicate"),
        (
            completion(json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (
            completion(json!({"response_format": {"type": "xml"}})),
            "response_format.type",
        ),
        (completion(json!({"logit_bias": {"abc": 1}})), "logit_bias"),
        (completion(json!({"temperature": -1})), "temperature"),
        (completion(json!({"n": 0})), "n"),
    ];
    for (body, field) in cases {
        let (status, err) = s.post_json("/v1/completions", body).await;
        assert_eq!(status, 400, "{field}: {err}");
        assert_eq!(err["error"]["param"], field, "{err}");
    }
    let chat = json!({"model": "stories260k", "messages": [{"role": "user", "content": "hi", "audio": "x"}]});
    let (status, err) = s.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "messages[0].audio");
    // Advisory fields pass.
    let (status, _) = s
        .post_json(
            "/v1/completions",
            completion(json!({"user": "u1", "metadata": {"a": "b"}})),
        )
        .await;
    assert_eq!(status, 200);
    let ollama_cases = [
        (
            json!({"model": "stories260k", "prompt": "hi", "frobnicate": true}),
            "frobnicate",
        ),
        (
            json!({"model": "stories260k", "prompt": "hi", "options": {"mirostat": 2}}),
            "options.mirostat",
        ),
        (
            json!({"model": "stories260k", "prompt": "hi", "options": {"temperature": -2}}),
            "options.temperature",
        ),
        // stories260k's template has no thoughts: thinking is refused, as Ollama refuses it.
        (json!({"model": "stories260k", "prompt": "hi", "think": true}), "think"),
        (
            json!({"model": "stories260k", "prompt": "hi", "think": "extreme"}),
            "think",
        ),
    ];
    for (body, field) in ollama_cases {
        let (status, err) = s.post_json("/api/generate", body).await;
        assert_eq!(status, 400, "{field}: {err}");
        assert!(err["error"].as_str().expect("error").contains(field), "{field}: {err}");
    }
    let hints = json!({"model": "stories260k", "prompt": "hi", "stream": false,
                       "options": {"num_thread": 2, "num_gpu": 1, "mirostat": 0, "num_predict": 2}});
    assert_eq!(s.post_json("/api/generate", hints).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_errors_name_the_field_of_the_endpoint() {
    let s = server().await;
    let long = "Once upon a time ".repeat(150);
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"prompt": long})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["param"], "prompt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_tokens_past_the_context_ends_the_reply_at_the_context() {
    let s = server().await;
    for (path, body) in [
        (
            "/v1/completions",
            completion(json!({"max_tokens": 100000, "ignore_eos": true})),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}],
                   "max_completion_tokens": 100000, "ignore_eos": true, "temperature": 0}),
        ),
    ] {
        let (status, body) = s.post_json(path, body).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{path}");
        let usage = &body["usage"];
        assert_eq!(usage["total_tokens"], 512, "{path}: the whole context is used: {usage}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_forces_and_bans_tokens() {
    let s = server().await;
    let forced = completion(json!({"logit_bias": {"500": 100}, "return_token_ids": true}));
    let (status, body) = s.post_json("/v1/completions", forced).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["token_ids"], json!(vec![500; 8]));
    let (_, plain) = s
        .post_json("/v1/completions", completion(json!({"return_token_ids": true})))
        .await;
    let first = plain["choices"][0]["token_ids"][0].as_u64().expect("id");
    let banned = completion(json!({"logit_bias": {first.to_string(): -100}, "return_token_ids": true}));
    let (_, body) = s.post_json("/v1/completions", banned).await;
    assert_ne!(body["choices"][0]["token_ids"][0].as_u64(), Some(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_copies_share_the_prompt_prefill_and_differ_by_seed() {
    let s = server().await;
    let prompt =
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.";
    let body = json!({"model": "stories260k", "prompt": prompt, "max_tokens": 12, "n": 3,
                      "temperature": 1.0, "seed": 7});
    let (status, reply) = s.post_json("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(
        choices.iter().map(|c| c["index"].as_u64()).collect::<Vec<_>>(),
        [Some(0), Some(1), Some(2)]
    );
    let prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    let full_blocks = prompt_tokens / 16 * 16;
    assert!(
        full_blocks >= 16,
        "the prompt fills at least one block: {prompt_tokens}"
    );
    let metrics = reqwest::get(s.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mlxd_prefix_cache_hits_total{model=\"stories260k\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("hits") as u64;
    assert!(
        hits >= 2 * full_blocks,
        "copies 1 and 2 start from copy 0's blocks: {hits} cached tokens"
    );
    assert_eq!(reply["usage"]["completion_tokens"], 36);
    let texts: Vec<&str> = choices.iter().map(|c| c["text"].as_str().expect("text")).collect();
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "seeds differ per copy: {texts:?}"
    );
    let (_, again) = s.post_json("/v1/completions", body).await;
    assert_eq!(again["choices"], reply["choices"], "seeded copies are reproducible");
    let chat = json!({"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 5, "n": 2, "temperature": 0});
    let (status, reply) = s.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(s.wait_pool_all_free().await.0, s.wait_pool_all_free().await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_list_gives_one_choice_per_prompt_streamed_or_not() {
    let s = server().await;
    let body = completion(json!({"prompt": ["Once upon a time", "The cat"], "max_tokens": 6}));
    let (status, reply) = s.post_json("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let texts: Vec<String> = reply["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect();
    assert_eq!(texts.len(), 2);
    let (_, single) = s
        .post_json(
            "/v1/completions",
            completion(json!({"prompt": "The cat", "max_tokens": 6})),
        )
        .await;
    assert_eq!(single["choices"][0]["text"].as_str(), Some(texts[1].as_str()));
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let events = post_sse(&s, "/v1/completions", stream_body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = [String::new(), String::new()];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("json");
        let i = v["choices"][0]["index"].as_u64().expect("index") as usize;
        streamed[i].push_str(v["choices"][0]["text"].as_str().expect("text"));
    }
    assert_eq!(streamed.to_vec(), texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_prompt_before_the_completion() {
    let s = server().await;
    let (_, plain) = s.post_json("/v1/completions", completion(json!({}))).await;
    let (status, echoed) = s.post_json("/v1/completions", completion(json!({"echo": true}))).await;
    assert_eq!(status, 200, "{echoed}");
    let want = format!(
        "Once upon a time{}",
        plain["choices"][0]["text"].as_str().expect("text")
    );
    assert_eq!(echoed["choices"][0]["text"].as_str(), Some(want.as_str()));
    let events = post_sse(&s, "/v1/completions", completion(json!({"echo": true, "stream": true}))).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).expect("json")["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_gives_each_prompt_token_its_logprob_given_the_tokens_before() {
    let s = server().await;
    let body = completion(json!({"echo": true, "logprobs": 2, "max_tokens": 4, "return_token_ids": true}));
    let (status, whole) = s.post_json("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    let prompt: Vec<u64> = choice["prompt_token_ids"]
        .as_array()
        .expect("prompt ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tokens.len(), prompt.len() + 4, "{lp}");
    assert_eq!(Some(tokens.concat().as_str()), choice["text"].as_str());
    let logprobs = lp["token_logprobs"].as_array().expect("token_logprobs");
    assert!(logprobs[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    assert!(
        logprobs[1..].iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)),
        "{lp}"
    );
    assert!(lp["top_logprobs"][1].as_object().is_some_and(|t| t.len() == 2), "{lp}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // Each prompt token's logprob is the one the model gives it after the tokens before it:
    // forced as the next token of the shorter prompt, it reports the same logprob.
    for i in 1..prompt.len() {
        let forced = json!({
            "model": "stories260k", "prompt": prompt[..i], "max_tokens": 1, "temperature": 0, "logprobs": 0,
            "logit_bias": {prompt[i].to_string(): 100},
        });
        let (status, next) = s.post_json("/v1/completions", forced).await;
        assert_eq!(status, 200, "{next}");
        let want = next["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .expect("logprob");
        let got = logprobs[i].as_f64().expect("logprob");
        assert!((got - want).abs() < 1e-3, "prompt token {i}: {got} vs {want}");
    }
    // The prompt is computed again (never read from the prefix cache), with the same result;
    // streamed, the first chunk leads with the prompt's tokens.
    let (_, again) = s.post_json("/v1/completions", body.clone()).await;
    assert_eq!(again["choices"][0]["logprobs"], *lp);
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{again}"
    );
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let events = post_sse(&s, "/v1/completions", streamed_body).await;
    let (mut streamed_tokens, mut streamed_logprobs) = (Vec::new(), Vec::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("json");
        if let Some(l) = v["choices"][0]["logprobs"].as_object() {
            streamed_tokens.extend(l["tokens"].as_array().expect("tokens").iter().cloned());
            streamed_logprobs.extend(l["token_logprobs"].as_array().expect("logprobs").iter().cloned());
        }
    }
    assert_eq!(Value::from(streamed_tokens), lp["tokens"]);
    assert_eq!(Value::from(streamed_logprobs), lp["token_logprobs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprob_token_texts_concatenate_to_the_text() {
    let s = server().await;
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"logprobs": 2, "max_tokens": 12})))
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let tokens: String = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("str"))
        .collect();
    assert_eq!(Some(tokens.as_str()), body["choices"][0]["text"].as_str());
    assert!(
        tokens.starts_with(' ') || tokens.starts_with(','),
        "leading space kept: {tokens:?}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(offsets[0], 0);
    let streamed_body = completion(json!({"logprobs": 2, "max_tokens": 12, "stream": true}));
    let events = post_sse(&s, "/v1/completions", streamed_body).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("json"))
        .filter_map(|v| v["choices"][0]["logprobs"]["tokens"].as_array().cloned())
        .flatten()
        .map(|t| t.as_str().expect("str").to_string())
        .collect();
    assert_eq!(streamed, tokens, "streamed logprob tokens are the same texts");
    let by_id = completion(
        json!({"logprobs": 2, "max_tokens": 4, "return_tokens_as_token_ids": true,
                                  "return_token_ids": true}),
    );
    let (_, body) = s.post_json("/v1/completions", by_id).await;
    let ids: Vec<String> = body["choices"][0]["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| format!("token_id:{i}"))
        .collect();
    assert_eq!(body["choices"][0]["logprobs"]["tokens"], json!(ids));
    let chat = json!({"model": "stories260k", "messages": [{"role": "user", "content": "Once upon a time"}],
                      "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, body) = s.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().expect("content");
    let joined: String = content.iter().map(|c| c["token"].as_str().expect("token")).collect();
    assert_eq!(Some(joined.as_str()), body["choices"][0]["message"]["content"].as_str());
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|c| {
            c["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8)
        })
        .collect();
    assert_eq!(String::from_utf8(bytes).ok(), Some(joined));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_finishes_with_stop_not_abort() {
    let s = server().await;
    let (_, plain) = s
        .post_json("/v1/completions", completion(json!({"max_tokens": 30})))
        .await;
    let text = plain["choices"][0]["text"].as_str().expect("text").to_string();
    let stop: String = text.chars().skip(8).take(4).collect();
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"max_tokens": 30, "stop": [stop]})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let kept = body["usage"]["completion_tokens"].as_u64().expect("tokens");
    assert!(kept < 30, "usage counts only the tokens up to the stop: {kept}");
    let metrics = reqwest::get(s.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("mlxd_request_success_total{model=\"stories260k\",finished_reason=\"stop\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("finished_reason=\"abort\"} 1"), "{metrics}");
    assert_eq!(
        s.engine.stats().num_aborted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_oversized_bodies_get_json_errors() {
    let s = server().await;
    let resp = reqwest::get(s.url("/v1/chat/completions")).await.expect("get");
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let resp = reqwest::get(s.url("/api/chat")).await.expect("get");
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.expect("json");
    assert!(body["error"].as_str().expect("ollama error").contains("GET"));
    let huge = completion(json!({"prompt": "a".repeat(33 << 20)}));
    let resp = s.send_json("/v1/completions", huge).await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_overload_answers_carry_retry_after() {
    let s = TestServer::start_with_admission(engine_config(&repo_model()), 0).await;
    let resp = s
        .send_json("/api/generate", json!({"model": "stories260k", "prompt": "hi"}))
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.expect("json");
    assert!(body["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_a_404_that_names_the_close_match() {
    let s = server().await;
    let (status, body) = s
        .post_json("/v1/completions", completion(json!({"model": "Stories260K-instruct"})))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("did you mean stories260k?"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_without_a_disk_cache_is_a_configuration_error_that_says_how_to_fix_it() {
    let s = server().await;
    let (status, body) = s
        .post_json(
            "/v1/kv/pin",
            json!({"model": "stories260k", "prompt": "Once upon a time"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["param"].is_null(), "not the model's fault: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--kv-disk"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_one_logprobs_chunk_gets_every_prompt_logprob() {
    let s = server().await;
    // Token ids, so the length is exact: 300 prompt tokens cross the 256-token chunk that a
    // request with prompt logprobs is prefilled in.
    let prompt: Vec<u64> = (0..300).map(|i| 3 + (i * 7919) % 500).collect();
    let body = json!({"model": "stories260k", "prompt": prompt, "echo": true, "logprobs": 0, "max_tokens": 1,
                      "temperature": 0});
    let (status, whole) = s.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{whole}");
    let logprobs = whole["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("logprobs")
        .clone();
    assert_eq!(logprobs.len(), 301);
    assert!(logprobs[0].is_null());
    assert!(logprobs[1..].iter().all(Value::is_number), "no gap at the chunk's edge");
    for i in [255usize, 256, 257, 299] {
        let forced = json!({
            "model": "stories260k", "prompt": prompt[..i], "max_tokens": 1, "temperature": 0, "logprobs": 0,
            "logit_bias": {prompt[i].to_string(): 100},
        });
        let (_, next) = s.post_json("/v1/completions", forced).await;
        let want = next["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .expect("logprob");
        let got = logprobs[i].as_f64().expect("logprob");
        assert!((got - want).abs() < 1e-3, "prompt token {i}: {got} vs {want}");
    }
}
