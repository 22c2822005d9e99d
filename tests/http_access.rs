//! Access control over real HTTP: API keys in each API's 401 shape, open health probes,
//! metrics behind the key unless made public, CORS for local and listed origins only, and
//! half-sent requests cut off by the read timeouts.

mod common;

use std::time::Duration;

use common::{engine_config, repo_model, TestServer};
use mlxd::server::auth::AccessOptions;
use mlxd::server::ServerOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn keyed(metrics_public: bool) -> TestServer {
    let options = ServerOptions {
        access: AccessOptions {
            api_keys: vec!["sk-one".into(), "sk-two".into()],
            metrics_public,
            cors_origins: vec!["https://chat.example".into()],
        },
        ..ServerOptions::default()
    };
    TestServer::start_with_options(engine_config(&repo_model()), options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_requires_a_key_and_answers_401_in_its_shape() {
    let s = keyed(false).await;
    let client = reqwest::Client::new();
    let resp = client.get(s.url("/v1/models")).send().await.expect("request");
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let resp = client.get(s.url("/api/tags")).send().await.expect("request");
    assert_eq!(resp.status(), 401);
    assert!(resp.json::<Value>().await.expect("json")["error"].is_string());
    let wrong = client
        .get(s.url("/v1/models"))
        .bearer_auth("sk-on")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    for key in ["sk-one", "sk-two"] {
        let ok = client
            .get(s.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .expect("request");
        assert_eq!(ok.status(), 200, "{key}");
    }
    let body = json!({"model": "stories260k", "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
    let ok = client
        .post(s.url("/api/generate"))
        .bearer_auth("sk-two")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    // The chat page and its assets load without a key (the page asks for one).
    for open in ["/health", "/", "/ui/app.js", "/ui/app.css"] {
        assert_eq!(
            client.get(s.url(open)).send().await.expect("request").status(),
            200,
            "{open}"
        );
    }
    assert_eq!(
        client.get(s.url("/metrics")).send().await.expect("request").status(),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_public_while_the_api_is_not() {
    let s = keyed(true).await;
    assert_eq!(reqwest::get(s.url("/metrics")).await.expect("request").status(), 200);
    assert_eq!(reqwest::get(s.url("/v1/models")).await.expect("request").status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_local_and_listed_origins_only() {
    let s = keyed(false).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    for origin in ["http://localhost:3000", "https://chat.example"] {
        let resp = preflight(origin).await.expect("preflight");
        assert!(resp.status().is_success(), "{origin}: {}", resp.status());
        assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    }
    let resp = preflight("https://evil.example").await.expect("preflight");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_and_bodies_are_cut_off() {
    let options = ServerOptions {
        body_read_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let s = TestServer::start_with_options(engine_config(&repo_model()), options).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // A body announced as 100 bytes of which 10 arrive: the request fails once the body stalls.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    tcp.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"prompt\":")
        .await
        .expect("write");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server answered and closed the stalled request");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 4"), "{reply}");
}
