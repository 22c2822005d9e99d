//! The Ollama routes over real HTTP: NDJSON wire format, errors, listings.

mod common;

use common::{engine_config, long_conversation, repo_model, TestServer};
use serde_json::{json, Value};

async fn server() -> TestServer {
    TestServer::start(engine_config(&repo_model())).await
}

/// Greedy options without Ollama's default repetition penalty.
fn greedy(num_predict: u32) -> Value {
    json!({"temperature": 0, "repeat_penalty": 1.0, "num_predict": num_predict})
}

async fn ndjson(s: &TestServer, path: &str, body: Value) -> Vec<Value> {
    let resp = s.send_json(path, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.expect("body");
    assert!(text.ends_with('\n'));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn assert_final_fields(last: &Value) {
    assert_eq!(last["done"], true);
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[key].is_u64(), "{key} missing in {last}");
    }
    assert!(last["total_duration"].as_u64() > Some(0));
    let created = last["created_at"].as_str().expect("created_at");
    assert!(created.parse::<jiff::Timestamp>().is_ok(), "RFC 3339: {created}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_ndjson_and_folds_to_the_same_text() {
    let s = server().await;
    let body = json!({"model": "stories260k", "prompt": "Once upon a time", "raw": true, "options": greedy(20)});
    let lines = ndjson(&s, "/api/generate", body.clone()).await;
    let (last, chunks) = lines.split_last().expect("lines");
    assert!(chunks.iter().all(|c| c["done"] == false && c["model"] == "stories260k"));
    assert_final_fields(last);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 20);
    assert_eq!(last["prompt_eval_count"], 5);
    let streamed: String = chunks
        .iter()
        .map(|c| c["response"].as_str().expect("response"))
        .collect();
    let mut whole = body;
    whole["stream"] = json!(false);
    let folded: Value = s.send_json("/api/generate", whole).await.json().await.expect("json");
    assert_eq!(folded["response"].as_str(), Some(streamed.as_str()));
    assert_eq!(folded["context"], last["context"]);
    assert_eq!(folded["context"].as_array().expect("context").len(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_equals_openai_completion_for_the_same_prompt_and_options() {
    let s = server().await;
    let body = json!({"model": "stories260k", "prompt": "Lily and Ben went to the park", "raw": true,
                      "stream": false, "options": greedy(40)});
    let ollama: Value = s.send_json("/api/generate", body).await.json().await.expect("json");
    let openai: Value = s.send_json("/v1/completions",
        json!({"model": "stories260k:latest", "prompt": "Lily and Ben went to the park", "max_tokens": 40, "temperature": 0}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(ollama["response"], openai["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_round_trip_continues_the_generation() {
    let s = server().await;
    let first: Value = s.send_json("/api/generate",
        json!({"model": "stories260k", "prompt": "Once upon a time", "raw": true, "stream": false, "options": greedy(12)}),
    )
    .await
    .json()
    .await
    .expect("json");
    let second: Value = s
        .send_json(
            "/api/generate",
            json!({"model": "stories260k", "prompt": "", "raw": true, "stream": false, "context": first["context"],
               "options": greedy(12)}),
        )
        .await
        .json()
        .await
        .expect("json");
    let whole: Value = s.send_json("/api/generate",
        json!({"model": "stories260k", "prompt": "Once upon a time", "raw": true, "stream": false, "options": greedy(24)}),
    )
    .await
    .json()
    .await
    .expect("json");
    let joined = format!(
        "{}{}",
        first["response"].as_str().expect("r"),
        second["response"].as_str().expect("r")
    );
    assert_eq!(joined, whole["response"].as_str().expect("r"));
    assert_eq!(second["context"], whole["context"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_messages_and_matches_openai_chat() {
    let s = server().await;
    let messages = json!([{"role": "system", "content": "You tell short stories."},
                          {"role": "user", "content": "Tell me about a cat."}]);
    let lines = ndjson(
        &s,
        "/api/chat",
        json!({"model": "stories260k", "messages": messages, "options": greedy(30)}),
    )
    .await;
    let (last, chunks) = lines.split_last().expect("lines");
    assert_final_fields(last);
    assert_eq!(last["message"]["role"], "assistant");
    assert!(last.get("context").is_none());
    let streamed: String = chunks
        .iter()
        .map(|c| c["message"]["content"].as_str().expect("content"))
        .collect();
    let openai: Value = s
        .send_json(
            "/v1/chat/completions",
            json!({"model": "stories260k", "messages": messages, "max_tokens": 30, "temperature": 0}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        openai["choices"][0]["message"]["content"].as_str(),
        Some(streamed.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prompt_or_messages_just_load_the_model() {
    let s = server().await;
    let g: Value = s
        .send_json("/api/generate", json!({"model": "stories260k"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (g["done"].clone(), g["done_reason"].clone(), g["response"].clone()),
        (json!(true), json!("load"), json!(""))
    );
    let c: Value = s
        .send_json("/api/chat", json!({"model": "stories260k", "messages": []}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(c["done_reason"], "load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_ollamas_shape_and_status() {
    let s = server().await;
    let cases = [
        (
            "/api/generate",
            json!({"model": "nope", "prompt": "hi"}),
            404,
            Some("model 'nope' not found; this server serves: stories260k"),
        ),
        (
            "/api/generate",
            json!({"model": "stories-260k", "prompt": "hi"}),
            404,
            Some("model 'stories-260k' not found; did you mean stories260k?"),
        ),
        (
            "/api/chat",
            json!({"model": "nope:7b", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            None,
        ),
        ("/api/generate", json!({"prompt": "hi"}), 400, Some("model is required")),
        (
            "/api/generate",
            json!({"model": "stories260k", "prompt": "hi", "format": 42}),
            400,
            None,
        ),
        (
            "/api/generate",
            json!({"model": "stories260k", "prompt": "hi", "images": ["aGk="]}),
            400,
            None,
        ),
        (
            "/api/generate",
            json!({"model": "stories260k", "prompt": "hi", "suffix": "end"}),
            400,
            None,
        ),
        (
            "/api/generate",
            json!({"model": "stories260k", "prompt": "hi", "options": {"temperature": "hot"}}),
            400,
            None,
        ),
        (
            "/api/chat",
            json!({"model": "stories260k", "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            None,
        ),
        ("/api/show", json!({"model": "nope"}), 404, None),
    ];
    for (path, body, status, message) in cases {
        let resp = s.send_json(path, body.clone()).await;
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        let err: Value = resp.json().await.expect("json");
        let text = err["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{{\"error\": string}} expected, got {err}"));
        if let Some(m) = message {
            assert_eq!(text, m);
        }
    }
    let malformed = reqwest::Client::new()
        .post(s.url("/api/chat"))
        .body("{oops")
        .send()
        .await
        .expect("request");
    assert_eq!(malformed.status(), 400);
    assert!(malformed.json::<Value>().await.expect("json")["error"].is_string());
    let unknown = reqwest::get(s.url("/api/nothing")).await.expect("request");
    assert_eq!(unknown.status(), 404);
    assert!(unknown.json::<Value>().await.expect("json")["error"].is_string());
    // Hardware hints and "off" values of unimplemented options pass; `keep_alive` is advisory.
    let ok = s
        .send_json(
            "/api/generate",
            json!({"model": "stories260k", "prompt": "hi", "stream": false, "keep_alive": "5m", "think": false,
               "options": {"num_predict": 2, "mirostat": 0, "num_gpu": 99}}),
        )
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_describe_the_served_model() {
    let s = server().await;
    let tags: Value = reqwest::get(s.url("/api/tags"))
        .await
        .expect("tags")
        .json()
        .await
        .expect("json");
    let m = &tags["models"][0];
    assert_eq!(m["name"], "stories260k:latest");
    assert_eq!(m["model"], "stories260k:latest");
    assert_eq!(
        m["size"],
        std::fs::metadata(repo_model().join("model.safetensors"))
            .expect("meta")
            .len()
    );
    assert_eq!(m["digest"].as_str().expect("digest").len(), 64);
    assert_eq!(m["details"]["family"], "llama");
    assert_eq!(m["details"]["parameter_size"], "260K");
    assert_eq!(m["details"]["quantization_level"], "F32");
    assert_eq!(m["details"]["format"], "safetensors");
    let show: Value = s
        .send_json("/api/show", json!({"model": "stories260k:latest"}))
        .await
        .json()
        .await
        .expect("json");
    let info = &show["model_info"];
    assert_eq!(info["general.architecture"], "llama");
    assert_eq!(info["llama.context_length"], 512);
    assert_eq!(info["llama.embedding_length"], 64);
    assert_eq!(info["llama.block_count"], 5);
    assert_eq!(info["llama.attention.head_count_kv"], 4);
    assert!(show["template"].as_str().expect("template").contains("Assistant:"));
    assert!(show["capabilities"]
        .as_array()
        .expect("caps")
        .contains(&json!("completion")));
    let ps: Value = reqwest::get(s.url("/api/ps"))
        .await
        .expect("ps")
        .json()
        .await
        .expect("json");
    assert_eq!(ps["models"][0]["name"], "stories260k:latest");
    assert!(ps["models"][0]["expires_at"]
        .as_str()
        .expect("expires")
        .parse::<jiff::Timestamp>()
        .is_ok());
    let version: Value = reqwest::get(s.url("/api/version"))
        .await
        .expect("v")
        .json()
        .await
        .expect("json");
    assert!(version["version"].is_string());
    let root = reqwest::get(s.url("/")).await.expect("root");
    assert_eq!(root.status(), 200);
    assert_eq!(root.text().await.expect("text"), "Ollama is running");
    let head = reqwest::Client::new().head(s.url("/")).send().await.expect("head");
    assert_eq!(head.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_stream_is_one_error_line() {
    let s = server().await;
    let mut resp = s
        .send_json(
            "/api/generate",
            json!({"model": "stories260k", "prompt": "Once upon a time", "raw": true,
               "options": {"num_predict": 400, "temperature": 0}}),
        )
        .await;
    resp.chunk().await.expect("chunk").expect("a first line");
    s.engine.shutdown();
    let mut rest = String::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let last: Value = serde_json::from_str(rest.lines().last().expect("a line")).expect("json");
    assert_eq!(last, json!({"error": "the engine is unavailable"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_model_management_routes_say_what_to_do_instead_of_404() {
    let s = server().await;
    let client = reqwest::Client::new();
    let cases = [
        ("POST", "/api/pull", "no registry access"),
        ("POST", "/api/push", "no registry access"),
        ("POST", "/api/create", "started with"),
        ("POST", "/api/copy", "started with"),
        ("DELETE", "/api/delete", "started with"),
    ];
    for (method, path, says) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = client
            .request(method, s.url(path))
            .json(&json!({"model": "qwen2.5:0.5b"}))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "{path}");
        let body: Value = resp.json().await.expect("json");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(says)),
            "{path}: {body}"
        );
    }
}

/// The final object of a non-streamed chat over `messages` (status and body).
async fn chat_once(s: &TestServer, messages: &[Value], extra: Value) -> (u16, Value) {
    let mut body = json!({"model": "stories260k", "messages": messages, "stream": false, "options": greedy(4)});
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    s.post_json("/api/chat", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_too_long_for_the_context_drops_its_oldest_turns_as_ollama_does() {
    let s = server().await;
    let messages = long_conversation(16);
    let (status, body) = chat_once(&s, &messages, json!({"truncate": false})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("512"), "{body}");
    let (status, fitted) = chat_once(&s, &messages, json!({})).await;
    assert_eq!(status, 200, "{fitted}");
    let evaluated = fitted["prompt_eval_count"].as_u64().expect("prompt_eval_count");
    assert!(evaluated > 0 && evaluated + 4 <= 512, "{fitted}");
    // The fitted prompt is the same each time: asked again, it is read from the prefix cache.
    let hits = || async {
        let text = reqwest::get(s.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let line = text
            .lines()
            .find(|l| l.starts_with("mlxd_prefix_cache_hits_total"))
            .expect("hits");
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .expect("value")
    };
    let before = hits().await;
    let (_, again) = chat_once(&s, &messages, json!({})).await;
    assert_eq!(again["prompt_eval_count"], fitted["prompt_eval_count"]);
    assert!(
        hits().await - before >= (evaluated - 16) as f64,
        "the fitted prompt was cached"
    );
    // Exactly the fewest oldest turns went: the system message and the last k exchanges fit
    // as they are, with the same prompt; one exchange more does not.
    let keep = |k: usize| -> Vec<Value> {
        let tail = &messages[messages.len() - (2 * k + 1)..];
        std::iter::once(messages[0].clone())
            .chain(tail.iter().cloned())
            .collect()
    };
    let mut fitting = None;
    for k in (0..16).rev() {
        let (status, body) = chat_once(&s, &keep(k), json!({"truncate": false})).await;
        if status == 200 {
            fitting = Some((k, body));
            break;
        }
    }
    let (k, direct) = fitting.expect("some tail fits");
    assert!(k > 0 && k < 16, "kept {k} exchanges");
    assert_eq!(
        direct["prompt_eval_count"], fitted["prompt_eval_count"],
        "the same prompt"
    );
    assert_eq!(direct["message"], fitted["message"], "the same greedy reply");
    // A system message alone longer than the context: the prompt's middle is cut after its
    // first four tokens, leaving the reply its 4 tokens (Ollama's runner cuts the same way).
    let huge = vec![
        json!({"role": "system", "content": "Cats. ".repeat(400)}),
        json!({"role": "user", "content": "Hi"}),
        json!({"role": "assistant", "content": "Hello"}),
        json!({"role": "user", "content": "And then?"}),
    ];
    let (status, body) = chat_once(&s, &huge, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt_eval_count"], 512 - 4, "{body}");
    let (status, body) = chat_once(&s, &huge, json!({"truncate": false})).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_prompt_too_long_for_the_context_is_cut_in_its_middle_as_ollama_s_runner_cuts() {
    let s = server().await;
    let generate = |extra: Value| {
        let mut body = json!({"model": "stories260k", "prompt": "Once upon a time ".repeat(150),
                              "stream": false, "options": greedy(3)});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        s.post_json("/api/generate", body)
    };
    let (status, body) = generate(json!({"shift": false})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt_eval_count"], 512 - 3, "{body}");
    assert_eq!(body["eval_count"], 3, "{body}");
    let (status, body) = generate(json!({"truncate": false})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("512"), "{body}");
    let (status, body) = generate(json!({"shift": true})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("shift"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_the_chat_page_and_ollama_probes_get_ollama_s_text() {
    let s = server().await;
    let client = reqwest::Client::new();
    let get = |path: &str, accept: Option<&str>| {
        let mut req = client.get(s.url(path));
        if let Some(accept) = accept {
            req = req.header("accept", accept);
        }
        req.send()
    };
    for accept in [None, Some("*/*"), Some("application/json")] {
        let probe = get("/", accept).await.expect("probe");
        assert_eq!(probe.text().await.expect("text"), "Ollama is running", "{accept:?}");
    }
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let page = get("/", Some(browser)).await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/html"));
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    let html = page.text().await.expect("html");
    // Every script is a file of this origin: nothing inline for the policy to allow.
    let scripts: Vec<&str> = html.match_indices("<script").map(|(i, _)| &html[i..]).collect();
    assert!(
        !scripts.is_empty() && scripts.iter().all(|s| s.starts_with("<script src=\"/ui/")),
        "{html}"
    );
    for (asset, kind) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let resp = get(&format!("/ui/{asset}"), None).await.expect("asset");
        assert_eq!(resp.status(), 200, "{asset}");
        assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with(kind));
        assert!(resp.headers().contains_key("content-security-policy"));
    }
    assert_eq!(get("/ui/secret.txt", None).await.expect("404").status(), 404);
    // --no-ui: browsers get Ollama's text too, and the assets are gone.
    let s = TestServer::start_adjusted(engine_config(&repo_model()), |s| s.ui = false).await;
    let page = client
        .get(s.url("/"))
        .header("accept", browser)
        .send()
        .await
        .expect("page");
    assert_eq!(page.text().await.expect("text"), "Ollama is running");
    let js = client.get(s.url("/ui/app.js")).send().await.expect("js");
    assert_eq!(js.status(), 404);
}
