//! `GET /openapi.json`: an OpenAPI 3.1 document of every route the server answers, generated
//! from the wire types.

mod common;

use common::{engine_config, repo_model, TestServer};
use serde_json::Value;

/// Every route the README promises, as (method, path).
const ROUTES: [(&str, &str); 34] = [
    ("post", "/v1/chat/completions"),
    ("post", "/v1/responses"),
    ("get", "/v1/responses/{id}"),
    ("delete", "/v1/responses/{id}"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/count_tokens"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("post", "/v1/rerank"),
    ("post", "/rerank"),
    ("post", "/v1/kv/pin"),
    ("post", "/v1/kv/unpin"),
    ("get", "/v1/models"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
    ("post", "/api/generate"),
    ("post", "/api/chat"),
    ("post", "/api/embed"),
    ("post", "/api/embeddings"),
    ("get", "/api/tags"),
    ("post", "/api/show"),
    ("get", "/api/ps"),
    ("get", "/api/version"),
    ("post", "/api/pull"),
    ("post", "/api/push"),
    ("post", "/api/create"),
    ("post", "/api/copy"),
    ("delete", "/api/delete"),
    ("get", "/"),
    ("get", "/ui/{asset}"),
    ("head", "/"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_every_route_and_every_documented_route_answers() {
    let s = TestServer::start(engine_config(&repo_model())).await;
    let doc: Value = reqwest::get(s.url("/openapi.json"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in ROUTES {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is documented"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().map_or(0, |o| o.len())).sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "no route is documented that the list lacks: {paths:?}"
    );
    // And the router answers each documented operation (no 404 or 405 from the fallbacks).
    let client = reqwest::Client::new();
    for (method, path) in ROUTES {
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let resp = client
            .request(m, s.url(&path.replace("{asset}", "app.js")))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        // A path with an id answers a 404 of its own for an unknown one, not the fallback's.
        let own_404 = path.contains('{')
            && status == 404
            && resp.json::<Value>().await.expect("json")["error"]["code"] == "response_not_found";
        assert!(own_404 || ![404, 405].contains(&status), "{method} {path}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_types_and_errors_are_in_the_document() {
    let doc = mlxd::server::openapi_document();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "ChatCompletionRequest",
        "ChatCompletion",
        "ChatCompletionChunk",
        "CompletionRequest",
        "Completion",
        "GenerateRequest",
        "GenerateResponse",
        "ChatRequest",
        "ChatResponse",
        "OpenAiErrorBody",
        "OllamaErrorBody",
    ] {
        assert!(schemas.contains_key(name), "{name} missing from {:?}", schemas.keys());
    }
    let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
    for status in ["200", "400", "401", "404", "413", "429", "500", "503"] {
        assert!(chat.get(status).is_some(), "chat documents {status}");
    }
    let stream = &chat["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"];
    assert_eq!(
        stream["anyOf"][1]["contentSchema"]["$ref"], "#/components/schemas/ChatCompletionChunk",
        "SSE events carry chunks: {chat}"
    );
    let ollama_error = &doc["paths"]["/api/chat"]["post"]["responses"]["400"]["content"]["application/json"]["schema"];
    assert_eq!(ollama_error["$ref"], "#/components/schemas/OllamaErrorBody");
}
