//! Property tests (proptest, stable Rust):
//! - random request bodies, shaped like the real ones but with any keys, types and values,
//!   through the in-process router with the repository's tiny model: never a panic, never a
//!   5xx, no failed engine step, and every KV block free once idle;
//! - random conversations through every bundled chat template: each renders or fails with a
//!   message, never a panic.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use common::{engine_config, repo_model, shared};
use mlxd::engine::EngineHandle;
use mlxd::server::{router, AppState, ServerOptions};
use mlxd::text::{ChatMessage, ChatTemplate, TextCodec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Random bodies sent by the router property (also printed, for the record).
const BODY_CASES: u32 = 256;

const ROUTES: [&str; 11] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/api/generate",
    "/api/chat",
    "/tokenize",
    "/detokenize",
    "/api/show",
    "/v1/chat/completions",
];

/// Field names of the three APIs, plus a few no API has.
const KEYS: [&str; 52] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "response_format",
    "return_token_ids",
    "suffix",
    "context",
    "raw",
    "system",
    "options",
    "format",
    "think",
    "keep_alive",
    "images",
    "tools",
    "tokens",
    "add_special_tokens",
    "best_of",
    "user",
    "frobnicate",
    "stop_sequences",
    "thinking",
    "tool_choice",
    "output_config",
    "context_management",
    "input",
    "instructions",
    "previous_response_id",
    "max_output_tokens",
    "text",
    "reasoning",
    "include",
    "",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(-2),
            Just(2),
            Just(16),
            Just(511),
            Just(512),
            Just(1 << 40)
        ]
        .prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        Just(json!(1e300)),
        "[a-z ]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(json!("stories260k")),
        prop::collection::vec(0u32..600, 0..12).prop_map(|v| json!(v)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["system", "user", "assistant", "tool", "developer", "wizard"]),
        prop_oneof![value(), any::<String>().prop_map(Value::from)],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let object = (
        prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), value(), 0..8),
        prop::option::weighted(0.7, prop::collection::vec(message(), 0..4)),
        prop::option::weighted(0.5, prop::collection::btree_map("[a-z_]{1,14}", leaf(), 0..5)),
        any::<bool>(),
    )
        .prop_map(|(fields, messages, options, named)| {
            let mut body: BTreeMap<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(m) = messages {
                body.insert("messages".into(), Value::Array(m));
            }
            if let Some(o) = options {
                body.insert("options".into(), json!(o));
            }
            if named {
                body.insert("model".into(), json!("stories260k"));
            }
            serde_json::to_vec(&body).unwrap_or_default()
        });
    prop_oneof![
        9 => object,
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

#[test]
fn random_request_bodies_never_cause_a_server_error_or_leak_blocks() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = engine_config(&repo_model());
    cfg.max_model_len = Some(128); // bounds every generation, whatever max_tokens says
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let codec = TextCodec::open(&repo_model(), &engine.info().model.eos_token_ids).expect("codec");
    let state = AppState::new(engine.clone(), Arc::new(codec), "stories260k".into(), 1024);
    let app = router(state, &ServerOptions::default());
    // A fixed seed: the share of valid bodies asserted below does not vary from run to run
    // (with a fresh seed it did, 8 to 17 of 256).
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: BODY_CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = (prop::sample::select(ROUTES.to_vec()), body());
    let statuses = std::sync::Mutex::new(BTreeMap::<u16, usize>::new());
    runner
        .run(&strategy, |(route, body)| {
            let text = String::from_utf8_lossy(&body).into_owned();
            let (status, reply) = runtime.block_on(async {
                let request = Request::post(route).body(Body::from(body)).expect("request");
                let response = app.clone().oneshot(request).await.expect("infallible");
                let status = response.status().as_u16();
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .expect("body");
                (status, String::from_utf8_lossy(&bytes).into_owned())
            });
            *statuses.lock().expect("lock").entry(status).or_default() += 1;
            prop_assert!(status < 500, "{route} {text} -> {status} {reply}");
            prop_assert!(!reply.contains("server_error"), "{route} {text} -> {reply}");
            prop_assert_eq!(engine.stats().num_failed_steps.load(Ordering::Relaxed), 0);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let statuses = statuses.into_inner().expect("lock");
    println!("{BODY_CASES} random bodies, answered with statuses {statuses:?}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 10,
        "some bodies were valid: {statuses:?}"
    );
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 10,
        "most were not: {statuses:?}"
    );
    let stats = engine.stats();
    let total = stats.kv_blocks_total.load(Ordering::Relaxed);
    for _ in 0..200 {
        if stats.kv_blocks_free.load(Ordering::Relaxed) == total {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        stats.kv_blocks_free.load(Ordering::Relaxed),
        total,
        "every block is free once idle"
    );
    assert!(engine.is_healthy());
}

/// The 70 corpus templates and the six family templates.
fn templates() -> &'static Vec<(String, ChatTemplate)> {
    static TEMPLATES: OnceLock<Vec<(String, ChatTemplate)>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut out = Vec::new();
        let corpus = shared("tokenizers/chat_templates");
        for entry in std::fs::read_dir(corpus).expect("corpus") {
            let path = entry.expect("entry").path();
            let source = std::fs::read_to_string(&path).expect("read");
            if let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>") {
                out.push((path.display().to_string(), t));
            }
        }
        for family in [
            "llama3.2",
            "qwen2.5",
            "qwen3",
            "gemma3",
            "mistral-nemo",
            "phi3-reconstructed",
        ] {
            let codec = TextCodec::load(&shared(&format!("tokenizers/{family}")), &[]).expect("codec");
            let source = codec.chat_template_source().expect("template").to_string();
            out.push((
                family.to_string(),
                ChatTemplate::new(&source, "<s>", "</s>").expect("compiles"),
            ));
        }
        assert!(out.len() >= 75, "{} templates", out.len());
        out
    })
}

fn conversation() -> impl Strategy<Value = Vec<ChatMessage>> {
    let role = prop_oneof![
        4 => prop::sample::select(vec!["system", "user", "assistant", "tool"]).prop_map(str::to_string),
        1 => "[a-z]{0,8}",
    ];
    let content = prop_oneof![
        "[a-zA-Z ,.!?]{0,40}",
        any::<String>(),
        Just("{{ messages }}{% endfor %}<|im_end|>[INST]".to_string()),
    ];
    prop::collection::vec(
        (role, content).prop_map(|(role, content)| ChatMessage::new(role, content)),
        0..6,
    )
}

proptest! {
    #![proptest_config(Config { cases: 48, failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_conversations_render_or_fail_clearly_in_every_template(
        messages in conversation(),
        add_generation_prompt in any::<bool>(),
    ) {
        for (name, template) in templates() {
            let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                template.render(&messages, add_generation_prompt)
            }));
            match rendered {
                Err(_) => prop_assert!(false, "{name} panicked on {messages:?}"),
                Ok(Err(e)) => prop_assert!(!e.0.is_empty(), "{name}: empty error"),
                Ok(Ok(_)) => {}
            }
        }
    }
}
