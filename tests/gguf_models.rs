//! GGUF files against llama.cpp's own outputs for the same files.

mod common;

use candle_core::DType;
use common::{ids, read_json, shared, ModelRunner};

/// Prompts, llama.cpp's greedy tokens and its top-2 logit margins per step.
struct Reference {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    margins: Vec<Vec<Option<f64>>>,
}

/// Which of llama.cpp's runs of a file to compare with.
#[derive(Clone, Copy)]
enum LlamaRun {
    /// Its defaults: f16 KV cache, flash attention in half precision.
    Main,
    /// `-fa off -ctk f32 -ctv f32`: float32 attention.
    F32Attention,
}

/// llama.cpp's `run` of `model`-`kind`.gguf.
fn reference(model: &str, kind: &str, run: LlamaRun) -> Reference {
    let refs = read_json(&shared(&format!("fixtures/gguf/refs/{model}-{kind}.json")));
    let run = match run {
        LlamaRun::F32Attention => &refs["other_runs"]["f32_attention"],
        LlamaRun::Main => &refs,
    };
    let prompts = refs["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .map(|s| ids(&s["prompt_ids"]))
        .collect();
    let seqs = run["sequences"].as_array().expect("run sequences");
    let greedy = seqs.iter().map(|s| ids(&s["greedy_ids"])).collect();
    let margins = seqs
        .iter()
        .map(|s| {
            s["llamacpp_top2_logit_margins"]
                .as_array()
                .map(|m| m.iter().map(|v| v.as_f64()).collect())
                .unwrap_or_default()
        })
        .collect();
    Reference {
        prompts,
        greedy,
        margins,
    }
}

/// Greedy tokens of every reference prompt, all prompts in one batch per step, with f32
/// compute and a KV cache of `kv_dtype`.
fn run(model: &str, kind: &str, kv_dtype: DType) -> Vec<Vec<u32>> {
    let path = shared(&format!("fixtures/gguf/{model}-{kind}.gguf"));
    let prompts = reference(model, kind, LlamaRun::Main).prompts;
    let mut runner = ModelRunner::load(&path, DType::F32, prompts.len(), 128).with_kv_dtype(kv_dtype);
    runner.greedy(&prompts, 32).tokens
}

/// Our greedy tokens `got` of `what` equal llama.cpp's until the end, or until a step where
/// llama.cpp's own top-2 margin is below `tie` (a near-tie that rounding differences may flip).
fn assert_matches_up_to_ties(reference: Reference, got: &[Vec<u32>], tie: f64, what: &str) {
    let Reference {
        greedy: want, margins, ..
    } = reference;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if let Some(step) = g.iter().zip(w).position(|(a, b)| a != b) {
            let margin = margins[i].get(step).copied().flatten();
            // llama-server leaves out probabilities of tokens ending mid-UTF-8: no margin known.
            assert!(
                margin.is_none_or(|m| m < tie),
                "{what} sequence {i} diverges at step {step} where llama.cpp's margin is {margin:?}\n got {g:?}\nwant {w:?}"
            );
        }
    }
}

#[test]
fn f32_gguf_files_reproduce_llama_cpp_greedy_tokens_exactly() {
    for model in ["stories260k", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] {
        let want = reference(model, "f32", LlamaRun::F32Attention).greedy;
        assert_eq!(run(model, "f32", DType::F32), want, "{model}-f32");
    }
}

#[test]
fn f16_gguf_files_reproduce_llama_cpp_up_to_exact_ties() {
    // Both llama.cpp and mlxd round activations to f16 for F16 matmuls on the CPU (the weights
    // stay f16); attention runs in f32 in both (the f32_attention run). Summation orders differ,
    // so near-ties (margins below 1e-2) may still go either way.
    for model in ["stories260k", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] {
        let reference = reference(model, "f16", LlamaRun::F32Attention);
        assert_matches_up_to_ties(reference, &run(model, "f16", DType::F32), 1e-2, &format!("{model}-f16"));
    }
}

#[test]
fn an_f16_kv_cache_follows_llama_cpp_s_own_f16_cache() {
    // f32 weights and compute, f16 KV (the server's default for quantized and half weights on
    // the CPU), against llama.cpp's main run: f16 KV, half-precision flash attention. Rounding
    // differs between the two, so near-ties (margins below 1e-2) may go either way.
    for model in ["stories260k", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] {
        let reference = reference(model, "f32", LlamaRun::Main);
        assert_matches_up_to_ties(reference, &run(model, "f32", DType::F16), 1e-2, &format!("{model}-f32"));
    }
}

#[test]
fn quantized_gguf_files_follow_llama_cpp_kernels() {
    for model in ["stories260k", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] {
        // Both quantize activations to Q8_0 blocks, with different rounding details; greedy
        // paths may part where llama.cpp's own top-2 margin is small (the fixture README's
        // dequantized runs part from llama.cpp's kernels the same way). f32 KV, so that only
        // the kernels differ.
        for kind in ["q8_0", "q4_0", "q4_k_m"] {
            let reference = reference(model, kind, LlamaRun::Main);
            assert_matches_up_to_ties(
                reference,
                &run(model, kind, DType::F32),
                0.15,
                &format!("{model}-{kind}"),
            );
        }
    }
}

#[test]
fn gguf_tokenizers_match_llama_cpp_where_it_agrees_with_the_hf_tokenizer() {
    for model in ["stories260k", "llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"] {
        let path = shared(&format!("fixtures/gguf/{model}-q8_0.gguf"));
        let codec = mlxd::text::TextCodec::from_gguf(&path).expect("codec");
        let refs = read_json(&shared(&format!("fixtures/gguf/refs/{model}-q8_0.json")));
        let mut checked = 0;
        for sample in refs["tokenizer"]["samples"].as_array().expect("samples") {
            // mistral/phi3 GGUF vocabularies lost information in conversion (flat scores,
            // specials typed normal); only samples where llama.cpp and HF agree are checked.
            if sample["llamacpp_ids"] != sample["ref_ids"] {
                continue;
            }
            let text = sample["text"].as_str().expect("text");
            assert_eq!(
                codec.encode(text, true).expect("encodes"),
                ids(&sample["llamacpp_ids"]),
                "{model}: {text:?}"
            );
            checked += 1;
        }
        assert!(checked >= 8, "{model}: {checked} samples");
        assert!(codec.chat_template().is_some(), "{model} carries its chat template");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_file_serves_over_both_apis() {
    let s = common::TestServer::start(common::engine_config(&shared("fixtures/gguf/stories260k-q8_0.gguf"))).await;
    let reference = read_json(&shared("models/stories260k/reference.json"));
    let client = reqwest::Client::new();
    let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let c: serde_json::Value = client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let want = reference["generations"][1]["generated_text"].as_str().expect("text");
    assert!(want.starts_with(c["choices"][0]["text"].as_str().expect("text")), "{c}");
    let tags: serde_json::Value = reqwest::get(s.url("/api/tags"))
        .await
        .expect("tags")
        .json()
        .await
        .expect("json");
    assert_eq!(tags["models"][0]["details"]["format"], "gguf");
    assert_eq!(tags["models"][0]["details"]["quantization_level"], "Q8_0");
    assert_eq!(tags["models"][0]["details"]["parameter_size"], "260K");
}
