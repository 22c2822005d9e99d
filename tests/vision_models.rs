//! Gemma 3 with images against transformers 5.25's float32 references
//! (`tests/data/gemma3_vision/make_fixtures.py`): the processor's pixels, its prompt ids (the
//! chat template's image places expanded to soft tokens), and every greedy step's full
//! log-probabilities, for all prompts at once through the engine with chunked prefill (an
//! image's soft tokens in one step) and again from the prefix cache; and the prefix cache
//! keeping images apart by content.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{engine_config, ids, max_abs_diff, read_json};
use mlxd::engine::{EngineHandle, TokenEvent};
use mlxd::request::{validate, GenerationSpec, MaxTokens, Prompt, RequestError, RequestLimits, SamplingParams};
use mlxd::text::{ChatImage, ChatMessage, ChatPrompt, TextCodec};

/// Two float32 implementations agree to ~1e-5; the fixture's greedy margins are ≥ 2e-3.
const F32_TOL: f32 = 2e-4;
/// The same with pixels resized by the `image` crate instead of PIL (measured: 8.2e-4 at most).
const RESIZED_TOL: f32 = 1.5e-3;
/// One 8-bit level after normalization (`2 / 255`), plus float slack.
const ONE_LEVEL: f32 = 2.0 / 255.0 + 1e-6;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3_vision")
}

fn image_bytes(name: &str) -> Arc<[u8]> {
    Arc::from(std::fs::read(fixture().join("images").join(format!("{name}.png"))).expect("image file"))
}

/// The reference's messages (content parts; images by file name) as template messages.
fn messages(json: &serde_json::Value) -> Vec<ChatMessage> {
    json.as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let mut message = ChatMessage::new(m["role"].as_str().expect("role"), "");
            for part in m["content"].as_array().expect("parts") {
                match part["type"].as_str() {
                    Some("text") => message.content.push_str(part["text"].as_str().expect("text")),
                    _ => message.images.push(ChatImage {
                        bytes: image_bytes(part["image"].as_str().expect("image name")),
                        at: message.content.len(),
                    }),
                }
            }
            message
        })
        .collect()
}

/// A greedy request for `messages` reporting the whole vocabulary's log-probabilities at
/// every step, `steps` long and never stopping early.
fn greedy_spec(messages: Vec<ChatMessage>, steps: u32, vocab: usize) -> GenerationSpec {
    let mut spec = GenerationSpec::new(Prompt::Chat(ChatPrompt::new(messages)));
    spec.sampling = SamplingParams {
        report_tokens: (0..vocab as u32).collect(),
        ..SamplingParams::greedy()
    };
    spec.max_tokens = MaxTokens::Exactly(steps);
    spec.ignore_eos = true;
    spec
}

/// One request's tokens, each step's reported log-probabilities and its cached prompt tokens.
struct Run {
    tokens: Vec<u32>,
    logprobs: Vec<Vec<f32>>,
    cached: u32,
}

async fn run(engine: &EngineHandle, request: mlxd::request::ValidatedRequest) -> Run {
    let mut stream = engine.submit(request).expect("submit");
    let mut out = Run {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        cached: 0,
    };
    while let Some(ev) = stream.recv().await {
        match ev {
            TokenEvent::Scheduled { cached_tokens } => out.cached = cached_tokens,
            TokenEvent::Token { id, logprobs } => {
                out.tokens.push(id);
                let reported = logprobs.expect("logprobs").reported;
                out.logprobs.push(reported.iter().map(|t| t.logprob).collect());
            }
            TokenEvent::Finished { .. } => break,
            TokenEvent::Error(e) => panic!("engine error: {e}"),
            TokenEvent::Embedding(_) | TokenEvent::PromptLogprobs { .. } => {}
        }
    }
    out
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum = max + sum.ln() as f32;
    logits.iter().map(|&x| x - log_sum).collect()
}

/// The engine over the fixture (`model`, with `mmproj` beside a GGUF), with steps of at most
/// 8 tokens in blocks of 4: prompts are prefilled in chunks, an image's 4 soft tokens straddle
/// chunk and block boundaries. The tokenizer side is the folder's.
fn engine_over(model: PathBuf, mmproj: Option<PathBuf>) -> (EngineHandle, TextCodec, RequestLimits) {
    let mut cfg = engine_config(&model);
    cfg.mmproj = mmproj;
    cfg.max_num_batched_tokens = Some(8);
    cfg.block_size = 4;
    cfg.max_model_len = Some(256);
    let codec = common::codec(&fixture().join("f32"));
    let (engine, _join) = EngineHandle::spawn(cfg).expect("engine");
    let limits = engine.info().request_limits("gemma3-vision", &codec);
    (engine, codec, limits)
}

/// The Hugging Face folder's engine.
fn engine() -> (EngineHandle, TextCodec, RequestLimits) {
    engine_over(fixture().join("f32"), None)
}

/// Every reference conversation through `engine`, all at once, `rounds` times (the later ones
/// from the prefix cache): the prompt ids and greedy ids equal transformers', every step's
/// log-probabilities within `tol(name)`.
async fn follow_transformers(
    (engine, codec, limits): (EngineHandle, TextCodec, RequestLimits),
    rounds: usize,
    tol: impl Fn(&str) -> f32,
) {
    assert!(limits.vision.is_some(), "the fixture loads as a vision model");
    let refs = read_json(&fixture().join("refs/transformers-f32.json"));
    let tensors = candle_core::safetensors::load(fixture().join("refs/transformers-f32.safetensors"), &Device::Cpu)
        .expect("refs");
    let steps = refs["greedy_steps"].as_u64().expect("steps") as u32;
    let seqs = refs["sequences"].as_array().expect("sequences");
    for round in 0..rounds {
        let mut runs = Vec::new();
        for s in seqs {
            let spec = greedy_spec(messages(&s["messages"]), steps, limits.vocab_size);
            let request = validate(spec, &codec, &limits).expect("valid request");
            assert_eq!(
                request.prompt(),
                ids(&s["input_ids"]).as_slice(),
                "{}: prompt ids",
                s["name"]
            );
            runs.push(run(&engine, request));
        }
        let runs = futures::future::join_all(runs).await;
        for (s, got) in seqs.iter().zip(runs) {
            let name = s["name"].as_str().expect("name");
            assert_eq!(got.tokens, ids(&s["greedy"]), "{name} round {round}: greedy ids");
            let want = tensors[&format!("{name}.step_logits")]
                .to_vec2::<f32>()
                .expect("logits");
            for (step, (got, want)) in got.logprobs.iter().zip(&want).enumerate() {
                let diff = max_abs_diff(got, &log_softmax(want));
                assert!(
                    diff < tol(name),
                    "{name} round {round} step {step}: logprobs differ by {diff}"
                );
            }
            if round > 0 {
                assert!(
                    got.cached > 0,
                    "{name}: the second round reads its prefix from the cache"
                );
            }
        }
    }
}

#[tokio::test]
async fn gemma3_with_images_matches_transformers_f32() {
    // Pixels resized here differ from PIL's by a level (pixels_follow_the_processor); the
    // logprobs follow by up to 8.2e-4. Images at the tower's size are the processor's exactly,
    // and so are the logprobs.
    follow_transformers(
        engine(),
        2,
        |name| if name == "one_image" { F32_TOL } else { RESIZED_TOL },
    )
    .await;
}

/// The same model as llama.cpp's converter writes it: the text GGUF and its mmproj
/// (`make_gguf.py`; the input projection in F16). The tokenizer stays the folder's: the
/// fixture's tiny vocabulary has no pre-tokenizer llama.cpp knows, and its GGUF copy does not
/// tokenize the same (real Gemma 3 GGUFs do; `gguf_models.rs`).
#[tokio::test]
async fn gguf_with_its_mmproj_matches_transformers_f32() {
    let dir = fixture().join("gguf");
    let engine = engine_over(dir.join("text-f32.gguf"), Some(dir.join("mmproj-f32.gguf")));
    follow_transformers(
        engine,
        1,
        |name| if name == "one_image" { F32_TOL } else { RESIZED_TOL },
    )
    .await;
}

/// Pixels as the tower takes them: exactly the processor's when no resize is needed; through
/// a resize within one level of PIL's bilinear (its integer passes round twice; measured: one
/// level at most).
#[test]
fn pixels_follow_the_processor() {
    let (_engine, _codec, limits) = engine();
    let vision = limits.vision.expect("vision");
    let tensors = candle_core::safetensors::load(fixture().join("refs/transformers-f32.safetensors"), &Device::Cpu)
        .expect("refs");
    for (name, tol) in [("square64", 1e-6), ("wide100x80", ONE_LEVEL), ("small40x30", ONE_LEVEL)] {
        let got = vision.prepare(&image_bytes(name)).expect("decodes");
        let want: &Tensor = &tensors[&format!("image.{name}.pixel_values")];
        let want: Vec<f32> = want.flatten_all().and_then(|t| t.to_vec1()).expect("pixels");
        let diff = max_abs_diff(&got.data, &want);
        assert!(diff <= tol, "{name}: pixels differ by {diff}");
    }
}

/// The prefix cache keys soft tokens by their image: the same conversation again reuses the
/// image's KV; the same text with another image reuses nothing from the image on.
#[tokio::test]
async fn the_prefix_cache_tells_images_apart() {
    let (engine, codec, limits) = engine();
    let chat = |image: &str| {
        let mut user = ChatMessage::new("user", "What is it?");
        user.images.push(ChatImage {
            bytes: image_bytes(image),
            at: 0,
        });
        let spec = greedy_spec(vec![user], 2, 8);
        validate(spec, &codec, &limits).expect("valid")
    };
    let first = chat("square64");
    let image_start = first.into_parts().images[0].span.start as u32;
    let prompt_len = chat("square64").prompt().len() as u32;
    run(&engine, chat("square64")).await;
    let again = run(&engine, chat("square64")).await;
    assert!(
        again.cached >= prompt_len - 4,
        "same image: {} of {prompt_len} cached",
        again.cached
    );
    let other = run(&engine, chat("small40x30")).await;
    assert!(
        other.cached <= image_start,
        "another image: {} cached, its image starts at {image_start}",
        other.cached
    );
}

fn invalid_message(e: RequestError) -> String {
    match e {
        RequestError::Invalid { message, .. } => message,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn bad_images_are_refused_before_the_engine() {
    let (_engine, codec, limits) = engine();
    let with_images = |images: Vec<Arc<[u8]>>, text: &str| {
        let mut user = ChatMessage::new("user", text);
        user.images = images.into_iter().map(|bytes| ChatImage { bytes, at: 0 }).collect();
        validate(greedy_spec(vec![user], 2, 8), &codec, &limits)
    };
    let err = invalid_message(with_images(vec![Arc::from(&b"not a picture"[..])], "hi").unwrap_err());
    assert!(err.contains("image 1 is not a PNG"), "{err}");
    let many = vec![image_bytes("square64"); mlxd::engine::MAX_IMAGES_PER_REQUEST + 1];
    let err = invalid_message(with_images(many, "hi").unwrap_err());
    assert!(err.contains("takes at most"), "{err}");
    let err = invalid_message(with_images(vec![image_bytes("square64")], "see <image_soft_token>").unwrap_err());
    assert!(err.contains("image token"), "{err}");
    let err = invalid_message(with_images(vec![image_bytes("square64")], "see <start_of_image>").unwrap_err());
    assert!(err.contains("marks 2 image places"), "{err}");

    let text_only = common::repo_model();
    let (plain, _join) = EngineHandle::spawn(engine_config(&text_only)).expect("engine");
    let plain_codec = common::codec(&text_only);
    let plain_limits = plain.info().request_limits("stories260k", &plain_codec);
    let mut user = ChatMessage::new("user", "hi");
    user.images.push(ChatImage {
        bytes: image_bytes("square64"),
        at: 0,
    });
    let err = invalid_message(validate(greedy_spec(vec![user], 2, 8), &plain_codec, &plain_limits).unwrap_err());
    assert!(err.contains("model `stories260k` has no vision input"), "{err}");
}

/// The message of an OpenAI-shaped error body.
fn openai_message(body: &serde_json::Value) -> &str {
    body["error"]["message"].as_str().expect("an error message")
}

/// The fixture's first reference conversation (an image, then text) sent through each API
/// over HTTP: every one answers with transformers' greedy continuation; a text-only model
/// answers each in its own error shape, naming itself.
#[tokio::test]
async fn every_api_takes_images() {
    use base64::Engine as _;
    let refs = read_json(&fixture().join("refs/transformers-f32.json"));
    let one = &refs["sequences"][0];
    assert_eq!(one["name"], "one_image");
    let greedy = ids(&one["greedy"]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(image_bytes("square64"));
    let text = "Describe this picture.";
    let mut cfg = engine_config(&fixture().join("f32"));
    cfg.max_model_len = Some(256);
    let server = common::TestServer::start(cfg).await;
    let openai = serde_json::json!({
        "model": "stories260k", "temperature": 0, "max_tokens": 8,
        "logprobs": true, "return_tokens_as_token_ids": true,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}"), "detail": "auto"}},
            {"type": "text", "text": text}]}],
    });
    let (status, body) = server.post_json("/v1/chat/completions", openai.clone()).await;
    assert_eq!(status, 200, "{body}");
    let tokens: Vec<u32> = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|t| {
            t["token"]
                .as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .expect("an id")
                .parse()
                .expect("id")
        })
        .collect();
    assert_eq!(tokens, greedy, "OpenAI: transformers' greedy ids");
    // The other APIs give the same text (the ids decoded as every API streams them).
    let want = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    let ollama = serde_json::json!({
        "model": "stories260k", "stream": false, "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8},
        "messages": [{"role": "user", "content": text, "images": [b64]}],
    });
    let (status, body) = server.post_json("/api/chat", ollama.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"]["content"], want.as_str(), "Ollama chat");
    let generate = serde_json::json!({
        "model": "stories260k", "stream": false, "prompt": text, "images": [b64],
        "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8},
    });
    let (status, body) = server.post_json("/api/generate", generate).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], want.as_str(), "Ollama generate");
    let mut prompt_and_reply = ids(&one["input_ids"]);
    prompt_and_reply.extend(&greedy);
    assert_eq!(
        ids(&body["context"]),
        prompt_and_reply,
        "Ollama generate: the prompt as transformers' processor makes it"
    );
    let anthropic = serde_json::json!({
        "model": "stories260k", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
            {"type": "text", "text": text}]}],
    });
    let (status, body) = server.post_json("/v1/messages", anthropic.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"][0]["text"], want.as_str(), "Anthropic");

    let responses = serde_json::json!({
        "model": "stories260k", "temperature": 0, "max_output_tokens": 8,
        "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": format!("data:image/png;base64,{b64}")},
            {"type": "input_text", "text": text}]}],
    });
    let (status, body) = server.post_json("/v1/responses", responses).await;
    assert_eq!(status, 200, "{body}");
    let message = body["output"]
        .as_array()
        .expect("output")
        .iter()
        .find(|item| item["type"] == "message")
        .expect("a message item");
    assert_eq!(message["content"][0]["text"], want.as_str(), "Responses");
    // vLLM's /tokenize counts the image as the soft tokens it becomes: the processor's ids.
    let tokenize = serde_json::json!({"model": "stories260k", "messages": openai["messages"]});
    let (status, body) = server.post_json("/tokenize", tokenize.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ids(&body["tokens"]),
        ids(&one["input_ids"]),
        "/tokenize: the processor's ids"
    );
    assert_eq!(body["count"], one["input_ids"].as_array().expect("ids").len());

    // Wrappers each API refuses in its own shape.
    let mut remote = openai.clone();
    remote["messages"][0]["content"][0]["image_url"]["url"] = "https://example.com/cat.png".into();
    let (status, body) = server.post_json("/v1/chat/completions", remote).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages[0].content[0].image_url.url", "{body}");
    let mut garbled = ollama.clone();
    garbled["messages"][0]["images"][0] = "%%%".into();
    let (status, body) = server.post_json("/api/chat", garbled).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().expect("error").contains("base64"), "{body}");
    let mut extra = openai.clone();
    extra["messages"][0]["content"][0]["image_url"]["fit"] = "cover".into();
    let (status, body) = server.post_json("/v1/chat/completions", extra).await;
    assert_eq!(status, 400, "an unknown image_url field is refused, not ignored");
    assert_eq!(body["error"]["param"], "messages[0].content[0].image_url.fit", "{body}");
    let mut extra = openai.clone();
    extra["messages"][0]["content"][1]["weight"] = 2.into();
    let (status, body) = server.post_json("/v1/chat/completions", extra).await;
    assert_eq!(status, 400, "an unknown part field is refused, not ignored");
    assert_eq!(body["error"]["param"], "messages[0].content[1].weight", "{body}");
    let mut hinted = openai.clone();
    hinted["messages"][0]["content"][1]["cache_control"] = serde_json::json!({"type": "ephemeral"});
    let (status, body) = server.post_json("/v1/chat/completions", hinted).await;
    assert_eq!(status, 200, "a caching hint on a part is accepted: {body}");
    let mut not_png = openai.clone();
    not_png["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,aGVsbG8=".into();
    let (status, body) = server.post_json("/v1/chat/completions", not_png).await;
    assert_eq!(status, 400);
    assert!(openai_message(&body).contains("image 1 is not a PNG"), "{body}");
    let (free, total) = server.wait_pool_all_free().await;
    assert_eq!(free, total, "every block is free again");

    let plain = common::TestServer::start(engine_config(&common::repo_model())).await;
    let (status, body) = plain.post_json("/v1/chat/completions", openai).await;
    assert_eq!(status, 400);
    assert!(openai_message(&body).contains("has no vision input"), "{body}");
    let (status, body) = plain.post_json("/api/chat", ollama).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().expect("error").contains("has no vision input"),
        "{body}"
    );
    let (status, body) = plain.post_json("/v1/messages", anthropic).await;
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert!(openai_message(&body).contains("has no vision input"), "{body}");
    let (status, body) = plain.post_json("/tokenize", tokenize).await;
    assert_eq!(status, 400);
    assert!(openai_message(&body).contains("has no vision input"), "{body}");
}

/// `--mmproj` goes with a GGUF model, and only a Gemma 3 projector is read: anything else
/// fails the load, naming the file.
#[test]
fn a_wrong_projector_fails_the_load_by_name() {
    let dir = fixture().join("gguf");
    let load = |model: PathBuf, mmproj: PathBuf| common::load_error(&model, Some(&mmproj));
    let err = load(fixture().join("f32"), dir.join("mmproj-f32.gguf"));
    assert!(err.contains("goes with a GGUF model"), "{err}");
    let err = load(dir.join("text-f32.gguf"), dir.join("text-f32.gguf"));
    assert!(err.contains("the projector is not Gemma 3's"), "{err}");
}

/// One greedy run of `messages` on a fresh engine whose prefix cache writes through to `dir`,
/// shut down afterwards (flushing the disk tier): its tokens, the prompt tokens the disk tier
/// gave back, the prompt's length and where its image starts.
async fn run_on_disk_tier(dir: &std::path::Path, messages: Vec<ChatMessage>) -> (Vec<u32>, f64, usize, usize) {
    let mut cfg = engine_config(&fixture().join("f32"));
    cfg.block_size = 4;
    cfg.max_model_len = Some(256);
    cfg.kv_disk = Some(mlxd::engine::kv_disk::KvDiskConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
    });
    let codec = common::codec(&cfg.model_path);
    let (engine, join) = EngineHandle::spawn(cfg).expect("engine");
    let limits = engine.info().request_limits("gemma3-vision", &codec);
    let request = validate(greedy_spec(messages, 4, 8), &codec, &limits).expect("valid");
    let (len, image_start) = (
        request.prompt().len(),
        request.clone().into_parts().images[0].span.start,
    );
    let tokens = run(&engine, request).await.tokens;
    let hits = common::disk_hits(&engine);
    engine.shutdown();
    drop(engine);
    join.join().expect("engine thread");
    (tokens, hits, len, image_start)
}

/// The disk tier keys image blocks as memory does: after a restart the same image's KV comes
/// back from disk and answers the same; another image with the same text gets no image block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_keeps_images_apart_across_restarts() {
    let dir = std::env::temp_dir().join(format!("mlxd-vision-disk-{}", std::process::id()));
    let chat = |image: &str| {
        let mut user = ChatMessage::new("user", "What is it?");
        user.images.push(ChatImage {
            bytes: image_bytes(image),
            at: 0,
        });
        vec![user]
    };
    let (scratch, hits, len, _) = run_on_disk_tier(&dir, chat("square64")).await;
    assert_eq!(hits, 0.0, "a fresh directory has nothing");
    let (again, hits, ..) = run_on_disk_tier(&dir, chat("square64")).await;
    assert_eq!(again, scratch, "the same answer from blocks read back");
    // Every full block before the last prompt token (blocks of 4), the image's included.
    assert_eq!(
        hits as usize,
        (len - 1) / 4 * 4,
        "the image's blocks came back from disk"
    );
    let (_, hits, _, image_start) = run_on_disk_tier(&dir, chat("small40x30")).await;
    assert_eq!(
        hits as usize,
        image_start / 4 * 4,
        "another image: only the blocks before it"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A loopback image host for the URL tests: `/cat.png` the fixture's image, `/big.png` one
/// byte over `limit`, `/gone.png` a 404, `/moved.png` a redirect to `moved_to`, `/slow.png`
/// an answer that never comes. Returns its base URL.
async fn image_host(limit: usize, moved_to: String) -> String {
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    let png = image_bytes("square64");
    let app = axum::Router::new()
        .route("/cat.png", get(move || async move { png.to_vec() }))
        .route("/big.png", get(move || async move { vec![0u8; limit + 1] }))
        .route("/gone.png", get(|| async { axum::http::StatusCode::NOT_FOUND }))
        .route(
            "/moved.png",
            get(move || async move { Redirect::temporary(&moved_to).into_response() }),
        )
        .route(
            "/slow.png",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                Vec::<u8>::new()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// `--allow-image-urls`: a remote image is fetched and read as its data: URL would be, on the
/// OpenAI chat, Responses, Anthropic (`url` sources) and /tokenize paths; the host list, the public-address rule (also
/// through DNS), the size and time limits and redirects are enforced, each failure a 400 naming
/// the part; without the flag nothing is fetched.
#[tokio::test]
async fn image_urls_are_fetched_only_as_allowed() {
    use base64::Engine as _;
    use mlxd::server::image_urls::{FetchLimits, ImageFetcher, ImageUrlPolicy};
    let limit = image_bytes("square64").len() + 100;
    let port_holder = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let elsewhere = format!(
        "http://localhost:{}/cat.png",
        port_holder.local_addr().expect("address").port()
    );
    let host = image_host(limit, elsewhere).await;
    let limits = FetchLimits {
        max_bytes: limit,
        timeout: std::time::Duration::from_millis(500),
        ..FetchLimits::default()
    };
    let fetcher = |policy| ImageFetcher::new(policy, limits).expect("fetcher");
    let mut cfg = engine_config(&fixture().join("f32"));
    cfg.max_model_len = Some(256);
    let allowed = fetcher(ImageUrlPolicy::from_hosts(&["127.0.0.1".into()]));
    let server = common::TestServer::start_adjusted(cfg.clone(), |state| state.image_urls = allowed).await;
    let chat = |url: &str| {
        serde_json::json!({
            "model": "stories260k", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe this picture."}]}],
        })
    };
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image_bytes("square64"))
    );
    let (status, by_data) = server.post_json("/v1/chat/completions", chat(&data_url)).await;
    assert_eq!(status, 200, "{by_data}");
    let reply = |body: &serde_json::Value| {
        body["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
            .to_string()
    };
    let want = reply(&by_data);
    let cat = format!("{host}/cat.png");
    let (status, body) = server.post_json("/v1/chat/completions", chat(&cat)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reply(&body), want, "the fetched image reads as its data: URL");
    let responses = serde_json::json!({
        "model": "stories260k", "temperature": 0, "max_output_tokens": 8,
        "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": cat},
            {"type": "input_text", "text": "Describe this picture."}]}],
    });
    let (status, body) = server.post_json("/v1/responses", responses).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"][0]["content"][0]["text"], want.as_str(), "{body}");
    let anthropic = |url: &str| {
        serde_json::json!({
            "model": "stories260k", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": url}},
                {"type": "text", "text": "Describe this picture."}]}],
        })
    };
    let (status, body) = server.post_json("/v1/messages", anthropic(&cat)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"][0]["text"], want.as_str(), "{body}");
    let (status, body) = server
        .post_json("/v1/messages", anthropic(&format!("{host}/gone.png")))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        openai_message(&body).contains("messages.0.content.0.source.url: fetching"),
        "{body}"
    );
    let tokenize = |url: &str| serde_json::json!({"model": "stories260k", "messages": chat(url)["messages"]});
    let (_, by_data) = server.post_json("/tokenize", tokenize(&data_url)).await;
    let (status, body) = server.post_json("/tokenize", tokenize(&cat)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], by_data["count"], "{body}");

    let field = "messages[0].content[0].image_url.url";
    let refused = |body: &serde_json::Value, why: &str| {
        assert_eq!(body["error"]["param"], field, "{body}");
        assert!(openai_message(body).contains(why), "{why}: {body}");
    };
    for (path, why) in [
        ("big.png", "larger than"),
        ("gone.png", "HTTP 404"),
        ("moved.png", "not among the hosts"),
        ("slow.png", "timed out"),
    ] {
        let (status, body) = server
            .post_json("/v1/chat/completions", chat(&format!("{host}/{path}")))
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        refused(&body, why);
    }
    let (status, body) = server
        .post_json("/v1/chat/completions", chat("ftp://127.0.0.1/cat.png"))
        .await;
    assert_eq!(status, 400);
    refused(&body, "http(s)");

    // Any public host: loopback is refused by address, and by what a name resolves to.
    let public =
        common::TestServer::start_adjusted(cfg.clone(), |state| state.image_urls = fetcher(ImageUrlPolicy::Public))
            .await;
    let (status, body) = public.post_json("/v1/chat/completions", chat(&cat)).await;
    assert_eq!(status, 400);
    refused(&body, "not a public address");
    let by_name = cat.replace("127.0.0.1", "localhost");
    let (status, body) = public.post_json("/v1/chat/completions", chat(&by_name)).await;
    assert_eq!(status, 400);
    refused(&body, "no public address");

    // By default nothing is fetched.
    let default = common::TestServer::start(cfg).await;
    let (status, body) = default.post_json("/v1/chat/completions", chat(&cat)).await;
    assert_eq!(status, 400);
    refused(&body, "--allow-image-urls");
    drop(port_holder);
}
