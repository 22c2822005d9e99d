//! The OpenAI routes over real HTTP on a loopback port.

mod common;

use common::{engine_config, long_conversation, read_json, repo_model, shared, TestServer};
use serde_json::{json, Value};

async fn server() -> TestServer {
    TestServer::start(engine_config(&repo_model())).await
}

/// Posts a streaming request and returns every SSE `data:` payload.
async fn post_sse(s: &TestServer, path: &str, body: Value) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.expect("body");
    text.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "stories260k",
        "messages": [{"role": "system", "content": "You tell short stories."},
                     {"role": "user", "content": "Tell me about a cat."}],
        "max_tokens": 40,
        "temperature": 0
    });
    body.as_object_mut()
        .expect("object")
        .extend(extra.as_object().expect("object").clone());
    body
}

fn assert_openai_error(body: &Value, param: Option<&str>) {
    let err = &body["error"];
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(err["type"].is_string(), "{body}");
    assert!(err.get("code").is_some() && err.get("param").is_some(), "{body}");
    if let Some(p) = param {
        assert_eq!(err["param"], p, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_of_reference_prompt_matches_llama2c_text() {
    let s = server().await;
    let reference = read_json(&shared("models/stories260k/reference.json"));
    let g = &reference["generations"][1];
    let (status, body) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["model"], "stories260k");
    assert_eq!(body["choices"][0]["text"], g["generated_text"]);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert_eq!(body["usage"]["completion_tokens"], 64);
    assert_eq!(body["usage"]["total_tokens"], 69);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_accepts_token_id_prompts() {
    let s = server().await;
    let (_, by_text) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Lily and Ben", "max_tokens": 20, "temperature": 0}),
        )
        .await;
    let codec = mlxd::text::TextCodec::load(&repo_model(), &[]).expect("codec");
    let ids = codec.encode("Lily and Ben", true).expect("encode");
    let (status, by_ids) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": ids, "max_tokens": 20, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], by_text["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_has_openai_shape() {
    let s = server().await;
    let (status, body) = s.post_json("/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert!(body["created"].as_i64().expect("created") > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().expect("content").is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().expect("finish")));
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().expect("p") + u["completion_tokens"].as_u64().expect("c"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_equals_non_streamed_and_ends_with_done() {
    let s = server().await;
    let (_, full) = s.post_json("/v1/chat/completions", chat_body(json!({}))).await;
    let events = post_sse(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        full["choices"][0]["message"]["content"].as_str().expect("content")
    );
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        full["usage"]["completion_tokens"]
    );
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &full["choices"][0]["finish_reason"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completion_equals_non_streamed() {
    let s = server().await;
    let body = json!({"prompt": "The cat", "max_tokens": 50, "temperature": 0});
    let (_, full) = s.post_json("/v1/completions", body.clone()).await;
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let events = post_sse(&s, "/v1/completions", stream_body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("json"))
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().expect("text"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_never_emitted_streamed_or_not() {
    let s = server().await;
    let base = json!({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stop": ["Lily", "zzz"]});
    let (_, full) = s.post_json("/v1/completions", base.clone()).await;
    assert_eq!(full["choices"][0]["text"], ", there was a little girl named ");
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
    let mut streamed = base;
    streamed["stream"] = json!(true);
    let events = post_sse(&s, "/v1/completions", streamed).await;
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("json"))
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, ", there was a little girl named ");
    let (free, total) = s.wait_pool_all_free().await;
    assert_eq!(free, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_reported_on_both_endpoints() {
    let s = server().await;
    let (_, c) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "logprobs": 2}),
        )
        .await;
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().expect("top").len(), 2);
    let first = lp["token_logprobs"][0].as_f64().expect("logprob");
    assert!(first < 0.0, "greedy token has a negative logprob");
    let (_, chat) = s
        .post_json(
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 3})),
        )
        .await;
    let content = chat["choices"][0]["logprobs"]["content"].as_array().expect("content");
    assert_eq!(content.len(), 4);
    let top = content[0]["top_logprobs"].as_array().expect("top");
    assert_eq!(top.len(), 3);
    // Greedy: the chosen token is the most likely one.
    assert_eq!(content[0]["logprob"], top[0]["logprob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_text_over_http() {
    let s = server().await;
    let body = json!({"prompt": "The dog", "max_tokens": 30, "temperature": 1.0, "seed": 77});
    let (_, a) = s.post_json("/v1/completions", body.clone()).await;
    let (_, b) = s.post_json("/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Seeds are signed 64-bit integers, as vLLM takes them: negative ones work, and the same
    // negative seed repeats itself; one past either end is refused.
    let negative = json!({"prompt": "The dog", "max_tokens": 30, "temperature": 1.0, "seed": -77});
    let (status, c) = s.post_json("/v1/completions", negative.clone()).await;
    assert_eq!(status, 200, "{c}");
    let (_, d) = s.post_json("/v1/completions", negative).await;
    assert_eq!(c["choices"][0]["text"], d["choices"][0]["text"]);
    for seed in ["9223372036854775808", "-9223372036854775809"] {
        let resp = reqwest::Client::new()
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"prompt": "The dog", "max_tokens": 3, "seed": {seed}}}"#))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "seed {seed}");
        let err: Value = resp.json().await.expect("json");
        assert!(
            err["error"]["message"].as_str().expect("message").contains("seed"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health_respond() {
    let s = server().await;
    let models: Value = reqwest::get(s.url("/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "stories260k");
    assert_eq!(models["data"][0]["object"], "model");
    let health = reqwest::get(s.url("/health")).await.expect("health");
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = server().await;
    let malformed = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(malformed.status(), 400);
    assert_openai_error(&malformed.json().await.expect("json"), None);

    let cases = [
        (chat_body(json!({"messages": []})), 400, "messages"),
        (chat_body(json!({"temperature": -0.5})), 400, "temperature"),
        (chat_body(json!({"top_p": 0})), 400, "top_p"),
        (chat_body(json!({"n": 0})), 400, "n"),
        (
            chat_body(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            "messages[0].role",
        ),
        (chat_body(json!({"model": "gpt-17"})), 404, "model"),
    ];
    for (body, status, param) in cases {
        let (got, err) = s.post_json("/v1/chat/completions", body).await;
        assert_eq!(got, status, "{err}");
        assert_openai_error(&err, Some(param));
    }
    let (status, err) = s
        .post_json("/v1/completions", json!({"prompt": [99999], "max_tokens": 2}))
        .await;
    assert_eq!(status, 400);
    assert_openai_error(&err, Some("prompt"));
    let unknown = reqwest::get(s.url("/v1/nothing")).await.expect("request");
    assert_eq!(unknown.status(), 404);
    assert_openai_error(&unknown.json().await.expect("json"), None);
    // Still serving.
    let (status, _) = s
        .post_json("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_overflow_names_the_token_counts() {
    let s = TestServer::start_adjusted(engine_config(&repo_model()), |s| s.strict_context = true).await;
    let (status, err) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 600}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    let msg = err["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("512") && msg.contains("605") && msg.contains("600"),
        "{msg}"
    );
    // A prompt beyond the context is refused whatever the rule for budgets.
    let s = server().await;
    let long = "Once upon a time ".repeat(150);
    let (status, err) = s
        .post_json("/v1/completions", json!({"prompt": long, "max_tokens": 4}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_too_long_for_the_context_is_fitted_as_on_ollama_s_api_unless_strict() {
    let s = server().await;
    let messages = long_conversation(16);
    let chat = json!({"messages": messages, "max_tokens": 4, "temperature": 0});
    let (status, fitted) = s.post_json("/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{fitted}");
    // The same conversation fitted by Ollama's API: the same turns dropped, the same reply.
    let ollama = json!({"model": "stories260k", "messages": messages, "stream": false,
                        "options": {"num_predict": 4, "temperature": 0, "repeat_penalty": 1.0}});
    let (status, on_ollama) = s.post_json("/api/chat", ollama).await;
    assert_eq!(status, 200, "{on_ollama}");
    assert_eq!(fitted["usage"]["prompt_tokens"], on_ollama["prompt_eval_count"]);
    assert_eq!(
        fitted["choices"][0]["message"]["content"],
        on_ollama["message"]["content"]
    );
    let prompt = fitted["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(prompt > 16 && prompt + 4 <= 512, "{fitted}");
    // One user message longer than the context: its middle is cut, the reply keeps its budget.
    let huge = json!({"messages": [{"role": "user", "content": "Cats. ".repeat(400)}], "max_tokens": 4});
    let (status, cut) = s.post_json("/v1/chat/completions", huge.clone()).await;
    assert_eq!(status, 200, "{cut}");
    assert_eq!(cut["usage"]["prompt_tokens"], 512 - 4, "{cut}");
    // --strict-context: OpenAI's 400 for both.
    let strict = TestServer::start_adjusted(engine_config(&repo_model()), |s| s.strict_context = true).await;
    for body in [chat, huge] {
        let (status, err) = strict.post_json("/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["code"], "context_length_exceeded");
        assert_eq!(err["error"]["param"], "messages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_mid_stream_frees_every_kv_block() {
    let s = server().await;
    let clients = (0..4).map(|_| {
        let req = reqwest::Client::new().post(s.url("/v1/completions")).json(&json!({
            "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0.7,
            "ignore_eos": true, "stream": true
        }));
        async move {
            let mut resp = req.send().await.expect("request");
            // Read a few events, then hang up.
            for _ in 0..3 {
                resp.chunk().await.expect("chunk");
            }
        }
    });
    futures::future::join_all(clients).await;
    let (free, total) = s.wait_pool_all_free().await;
    assert_eq!(free, total, "all KV blocks return to the pool after disconnects");
    let stats = s.engine.stats();
    assert_eq!(stats.num_running.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        stats.num_aborted.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "each stream was cancelled, not run to completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_kv_pool_end_at_it_or_with_strict_budgets_are_rejected_up_front() {
    let mut cfg = engine_config(&repo_model());
    cfg.kv_memory_bytes = Some(5 * 16 * 1280); // 4 usable blocks of 16 tokens
    let s = TestServer::start(cfg.clone()).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": true});
    let (status, reply) = s.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(reply["usage"]["total_tokens"], 64, "the whole pool: {reply}");
    let s = TestServer::start_adjusted(cfg, |s| s.strict_context = true).await;
    let (status, err) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 100}),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "kv_capacity_exceeded");
    let (status, _) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 40}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_failure_mid_stream_is_one_sse_error_event() {
    let s = server().await;
    let mut resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body(
            json!({"stream": true, "max_tokens": 400, "ignore_eos": true}),
        ))
        .send()
        .await
        .expect("request");
    let first = resp.chunk().await.expect("chunk").expect("first event");
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    s.engine.shutdown();
    let mut rest = String::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events: Vec<&str> = rest
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "engine_unavailable", "{rest}");
    assert!(!rest.contains("[DONE]"));
    let health = reqwest::get(s.url("/health")).await.expect("health");
    assert_eq!(health.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_token_ids_and_ignore_eos_expose_raw_ids() {
    let s = server().await;
    let reference = read_json(&shared("models/stories260k/reference.json"));
    let g = &reference["generations"][1];
    let (status, body) = s
        .post_json(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "return_token_ids": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["prompt_token_ids"], g["prompt_ids"]);
    assert_eq!(body["choices"][0]["token_ids"], g["generated_ids"]);
    // A prompt whose greedy continuation ends the story: with ignore_eos it runs to max_tokens.
    let stops_early = json!({"prompt": "They were happy", "max_tokens": 300, "temperature": 0});
    let (_, natural) = s.post_json("/v1/completions", stops_early.clone()).await;
    let mut ignoring = stops_early;
    ignoring["ignore_eos"] = json!(true);
    let (_, forced) = s.post_json("/v1/completions", ignoring).await;
    assert_eq!(natural["choices"][0]["finish_reason"], "stop");
    assert!(natural["usage"]["completion_tokens"].as_u64() < Some(300));
    assert_eq!(forced["usage"]["completion_tokens"], 300);
    assert_eq!(forced["choices"][0]["finish_reason"], "length");
    // Streamed: ids per chunk add up to the same sequence.
    let events = post_sse(
        &s,
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "return_token_ids": true, "stream": true}),
    )
    .await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["prompt_token_ids"], g["prompt_ids"]);
    let ids: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(Value::Array(ids), g["generated_ids"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_use_the_served_tokenizer() {
    let s = server().await;
    let reference = read_json(&shared("models/stories260k/reference.json"));
    let case = &reference["tokenizer"][2];
    let (status, t) = s.post_json("/tokenize", json!({"prompt": case["text"]})).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["tokens"], case["ids_with_bos"]);
    assert_eq!(t["count"], case["ids_with_bos"].as_array().expect("ids").len());
    assert_eq!(t["max_model_len"], 512);
    let (_, d) = s
        .post_json("/detokenize", json!({"tokens": case["ids_with_bos"]}))
        .await;
    assert_eq!(d["prompt"], case["decoded"]);
    // llama.cpp's field names for the same request; fields neither server has are refused.
    let (status, c) = s.post_json("/tokenize", json!({"content": case["text"]})).await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["tokens"], case["ids_with_bos"]);
    let (_, plain) = s
        .post_json("/tokenize", json!({"content": case["text"], "add_special": false}))
        .await;
    let without_bos = &case["ids_with_bos"].as_array().expect("ids")[1..];
    assert_eq!(plain["tokens"], Value::from(without_bos), "{plain}");
    let (status, err) = s
        .post_json("/tokenize", json!({"content": "hi", "with_pieces": true}))
        .await;
    assert_eq!(status, 400);
    assert_openai_error(&err, Some("with_pieces"));
    let example = &reference["chat_template_example"];
    let (_, chat) = s.post_json("/tokenize", json!({"messages": example["messages"]})).await;
    assert_eq!(chat["tokens"], example["ids_no_extra_special_tokens"]);
    let (status, err) = s.post_json("/detokenize", json!({"tokens": [100000]})).await;
    assert_eq!(status, 400);
    assert_openai_error(&err, Some("tokens"));
    let models: Value = reqwest::get(s.url("/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let details = &models["data"][0]["details"];
    assert_eq!(details["family"], "llama");
    assert_eq!(details["parameter_size"], "260K");
    assert_eq!(details["quantization"], "F32");
}
