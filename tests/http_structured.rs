//! Structured output over real HTTP on the bundled stories260k (a story model that knows nothing
//! of JSON): OpenAI `response_format` (json_schema on both endpoints, streamed and not) and
//! Ollama `format` produce output that parses and follows the schema at any temperature, ends
//! as `stop` when the schema's output is complete, and frees its KV blocks; a schema feature the
//! grammar engine lacks is a 400 naming the field.

mod common;

use common::{engine_config, repo_model, TestServer};
use serde_json::{json, Value};

async fn server() -> TestServer {
    TestServer::start(engine_config(&repo_model())).await
}

/// A schema whose every value is bounded, so any model completes it within the budget.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "pet": {"enum": ["cat", "dog", "bird"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {"verified": {"type": "boolean"}},
                "required": ["verified"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "string", "maxLength": 5}}
    })
}

/// Every constraint of `person_schema`, checked by hand.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
    for key in obj.keys() {
        assert!(
            ["name", "age", "pet", "tags", "owner"].contains(&key.as_str()),
            "extra key {key}: {text}"
        );
    }
    let name = obj["name"].as_str().expect("name is a string");
    assert!(name.chars().count() <= 12, "{text}");
    let age = obj["age"].as_i64().expect("age is an integer");
    assert!((0..=99).contains(&age), "{text}");
    assert!(
        ["cat", "dog", "bird"].contains(&obj["pet"].as_str().expect("pet")),
        "{text}"
    );
    let tags = obj["tags"].as_array().expect("tags is an array");
    assert!(tags.len() <= 3, "{text}");
    assert!(
        tags.iter().all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 5)),
        "{text}"
    );
    if let Some(owner) = obj.get("owner") {
        assert!(owner["verified"].is_boolean(), "{text}");
        assert_eq!(owner.as_object().map(|o| o.len()), Some(1), "{text}");
    }
}

fn response_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_follows_the_schema_on_both_endpoints_at_any_temperature() {
    let s = server().await;
    for (temperature, seed) in [(0.0, 0), (0.7, 1), (1.0, 2), (1.5, 3), (1.0, 4)] {
        let chat = json!({
            "model": "stories260k", "messages": [{"role": "user", "content": "Tell me about a pet."}],
            "max_tokens": 200, "temperature": temperature, "seed": seed, "response_format": response_format()
        });
        let (status, body) = s.post_json("/v1/chat/completions", chat).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        assert_person(body["choices"][0]["message"]["content"].as_str().expect("content"));

        let completion = json!({
            "model": "stories260k", "prompt": "Once upon a time", "max_tokens": 200,
            "temperature": temperature, "seed": seed, "response_format": response_format()
        });
        let (status, body) = s.post_json("/v1/completions", completion).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        assert_person(body["choices"][0]["text"].as_str().expect("text"));
    }
    let (free, total) = s.wait_pool_all_free().await;
    assert_eq!(free, total, "every KV block comes back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_structured_output_equals_the_unstreamed_one() {
    let s = server().await;
    let body = |stream: bool| {
        json!({
            "model": "stories260k", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0,
            "seed": 7, "stream": stream, "response_format": response_format()
        })
    };
    let (_, whole) = s.post_json("/v1/completions", body(false)).await;
    let text = s
        .send_json("/v1/completions", body(true))
        .await
        .text()
        .await
        .expect("stream");
    let streamed: String = text
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().expect("text"));
    assert_person(&streamed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_format_schema_is_enforced_on_generate_and_chat() {
    let s = server().await;
    let generate = json!({
        "model": "stories260k", "prompt": "Once upon a time", "stream": false, "format": person_schema(),
        "options": {"temperature": 0.9, "seed": 5, "num_predict": 200}
    });
    let (status, body) = s.post_json("/api/generate", generate).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["done_reason"], "stop", "{body}");
    assert_person(body["response"].as_str().expect("response"));
    let chat = json!({
        "model": "stories260k", "messages": [{"role": "user", "content": "hi"}], "stream": false,
        "format": person_schema(), "options": {"temperature": 0.5, "seed": 6, "num_predict": 200}
    });
    let (status, body) = s.post_json("/api/chat", chat).await;
    assert_eq!(status, 200, "{body}");
    assert_person(body["message"]["content"].as_str().expect("content"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_features_the_grammar_engine_lacks_are_a_400_naming_the_field() {
    let s = server().await;
    let unsupported = json!({"type": "object", "not": {"required": ["a"]}});
    let chat = json!({
        "model": "stories260k", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": unsupported}}
    });
    let (status, body) = s.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "response_format");
    assert!(
        body["error"]["message"].as_str().expect("message").contains("not"),
        "{body}"
    );
    let missing = json!({
        "model": "stories260k", "prompt": "hi",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}
    });
    let (status, body) = s.post_json("/v1/completions", missing).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "response_format.json_schema.schema");
    // A schema that compiles but cannot give a first mask is refused up front too, in one line.
    let body = json!({
        "model": "stories260k", "prompt": "hi", "max_tokens": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
    });
    let (status, body) = s.post_json("/v1/completions", body).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "response_format");
    assert!(
        !body["error"]["message"].as_str().expect("message").contains('\n'),
        "{body}"
    );
    // One whose grammar outgrows llguidance only after its first token fails that request alone,
    // in one line; the next request is served.
    let props: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("k{i}"), json!({"type": "integer", "minimum": 0, "maximum": 9})))
        .collect();
    let body = json!({
        "model": "stories260k", "prompt": "hi", "max_tokens": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": props}}}
    });
    let (status, body) = s.post_json("/v1/completions", body).await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("output constraint") && !message.contains('\n'),
        "{message}"
    );
    let (status, _) = s
        .post_json("/v1/completions", json!({"prompt": "hi", "max_tokens": 4}))
        .await;
    assert_eq!(status, 200);
    for (format, param) in [
        (json!({"type": "json_object", "extra": 1}), "response_format.extra"),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictly": true}}),
            "response_format.json_schema.strictly",
        ),
    ] {
        let body = json!({"model": "stories260k", "prompt": "hi", "response_format": format});
        let (status, body) = s.post_json("/v1/completions", body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let ollama = json!({"model": "stories260k", "prompt": "hi", "format": unsupported});
    let (status, body) = s.post_json("/api/generate", ollama).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().expect("error").contains("format"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_with_unbounded_values_close_before_the_budget_runs_out() {
    let s = server().await;
    let schema = json!({
        "type": "object",
        "properties": {
            "story": {"type": "string"},
            "hero": {"type": "string"},
            "notes": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["story", "hero"]
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "story", "schema": schema}});
    for (max_tokens, temperature, seed) in [(40, 0.8, 1), (64, 1.0, 2), (100, 1.3, 3), (48, 0.0, 4), (33, 1.0, 5)] {
        let body = json!({
            "model": "stories260k", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "response_format": format
        });
        let (status, body) = s.post_json("/v1/completions", body).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{body}");
        let text = choice["text"].as_str().expect("text");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert!(v["story"].is_string() && v["hero"].is_string(), "{text}");
        if let Some(notes) = v.get("notes") {
            assert!(
                notes.as_array().is_some_and(|n| n.iter().all(Value::is_string)),
                "{text}"
            );
        }
        assert!(
            body["usage"]["completion_tokens"].as_u64().expect("usage") <= max_tokens,
            "{body}"
        );
    }
    let object = json!({
        "model": "stories260k", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
        "temperature": 1.0, "seed": 9, "response_format": {"type": "json_object"}
    });
    let (_, body) = s.post_json("/v1/chat/completions", object).await;
    let text = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(
        serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()),
        "{text}"
    );
    let ollama = json!({
        "model": "stories260k", "prompt": "Once upon a time", "stream": false, "format": "json",
        "options": {"temperature": 0.9, "seed": 4, "num_predict": 40}
    });
    let (_, body) = s.post_json("/api/generate", ollama).await;
    let text = body["response"].as_str().expect("response");
    assert!(
        serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()),
        "{text}"
    );
    // Any JSON value (an empty schema): a number may simply end, so the output does.
    let any = json!({
        "model": "stories260k", "prompt": "hi", "stream": false, "format": {},
        "options": {"temperature": 0.9, "seed": 4, "num_predict": 40}
    });
    let (_, body) = s.post_json("/api/generate", any).await;
    assert_eq!(body["done_reason"], "stop", "{body}");
    let text = body["response"].as_str().expect("response");
    assert!(serde_json::from_str::<Value>(text).is_ok(), "{text}");
}
