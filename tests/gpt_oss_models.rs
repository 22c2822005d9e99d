//! gpt-oss against transformers 5.25's references (`tests/data/gpt_oss/make_fixtures.py`):
//! attention sinks, alternating sliding-window and full layers, YaRN, and experts with biases,
//! interleaved gate/up and the clamped SwiGLU; from the float32 folder and from the MXFP4 one
//! (transformers' dequantized run), every greedy step's logits and ids, batched; mlx-lm's 4-bit
//! copy against mlx-lm's exact dequantization.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{assert_follows_llama_cpp, assert_matches_reference, ids, max_abs_diff, read_json, ModelRunner};

/// Two float32 implementations agree to ~1e-5; the fixtures' greedy margins are ≥ 2e-3.
const F32_TOL: f32 = 2e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gpt_oss")
}

/// Every prompt of the reference set `refs/<reference>.*` through the folder `model`, together
/// in one batch per step: the greedy ids and every step's logits.
fn check_against(reference: &str, model: &str, tolerance: f32) {
    let refs = fixture().join("refs");
    let json = read_json(&refs.join(format!("{reference}.json")));
    let tensors = candle_core::safetensors::load(refs.join(format!("{reference}.safetensors")), &Device::Cpu)
        .expect("reference tensors");
    let seqs = json["sequences"].as_array().expect("sequences");
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let steps = json["greedy_steps"].as_u64().expect("steps") as usize;
    let run = ModelRunner::load(&fixture().join(model), DType::F32, prompts.len(), 128).greedy(&prompts, steps);
    let names: Vec<&str> = seqs.iter().map(|s| s["name"].as_str().expect("name")).collect();
    let greedy: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["greedy_ids"])).collect();
    assert_matches_reference(&run, &names, &greedy, &tensors, tolerance, model);
}

#[test]
fn gpt_oss_matches_transformers_f32_batched() {
    check_against("transformers-f32", "f32", F32_TOL);
}

/// Teacher-forced along the greedy ids of the reference set `refs/<reference>.*`, the logits
/// of the quantized folder `model` (the same weights as the reference's exact dequantization)
/// differ only by the CPU kernels' int8 activations: a mean below 0.35 and every step below
/// 1.5 but one, where rounding flips a near-tied choice between this tiny router's 8 experts
/// (below 4; measured for mlx-q4: mean 0.29, one step 3.9, the next 1.4; for mxfp4: mean 0.14,
/// largest 0.74). A wrong nibble order, scale, bias or gate/up row gives whole units
/// everywhere. The same folder dequantized exactly gives mlx-lm's logits to 1e-6 (checked by
/// hand, and on a GPU by tests/gpu/check_fixtures.py, which dequantizes it).
fn follows_dequantized(reference: &str, model: &str) {
    let refs = fixture().join("refs");
    let json = read_json(&refs.join(format!("{reference}.json")));
    let tensors = candle_core::safetensors::load(refs.join(format!("{reference}.safetensors")), &Device::Cpu)
        .expect("reference tensors");
    let seqs = json["sequences"].as_array().expect("sequences");
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let greedy: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["greedy_ids"])).collect();
    let got = ModelRunner::load(&fixture().join(model), DType::F32, prompts.len(), 128).forced(&prompts, &greedy);
    let mut diffs = Vec::new();
    for (seq, rows) in seqs.iter().zip(&got) {
        let name = seq["name"].as_str().expect("name");
        let want = tensors[&format!("{name}.step_logits")]
            .to_vec2::<f32>()
            .expect("step logits");
        assert_eq!(rows.len(), want.len(), "{name}: steps");
        diffs.extend(rows.iter().zip(&want).map(|(g, w)| max_abs_diff(g, w)));
    }
    diffs.sort_by(f32::total_cmp);
    let (worst, second) = (diffs[diffs.len() - 1], diffs[diffs.len() - 2]);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    eprintln!(
        "gpt_oss/{model}: logit difference from {reference}: mean {mean:.3}, largest {worst:.3}, next {second:.3}"
    );
    assert!(
        mean < 0.35 && second < 1.5 && worst < 4.0,
        "gpt_oss/{model}: mean {mean}, largest {worst}, next {second}"
    );
}

/// The MXFP4 folder as openai/gpt-oss-* ship theirs (`experts.*_blocks` / `_scales`), its
/// experts kept as 4-bit codes on the CPU, against transformers' exact dequantization of the
/// same bytes.
#[test]
fn mxfp4_folder_follows_transformers_dequantization() {
    follows_dequantized("transformers-mxfp4", "mxfp4");
}

/// mlx-lm's 4-bit copy (`mlx_lm.convert -q`: experts stacked as `experts.<gate|up|down>_proj`
/// `[experts, out, in]` with their biases, tests/data/moe/make_mlx.py) against mlx-lm's own run
/// of the same weights dequantized exactly, in float32.
#[test]
fn mlx_4bit_folder_follows_mlx_lm_s_exact_dequantization() {
    follows_dequantized("mlx-q4-exact", "mlx-q4");
}

/// The F32 GGUF llama.cpp's converter writes (experts de-interleaved into 3-D
/// `ffn_{gate,up,down}_exps` with their biases, read one expert at a time; sinks as
/// `attn_sinks`) gives transformers' logits.
#[test]
fn f32_gguf_matches_transformers() {
    check_against("transformers-f32", "gguf/gpt_oss-f32.gguf", F32_TOL);
}

/// Every GGUF file follows llama.cpp's own run of it: F32 exactly, Q8_0 / Q4_0 and the MXFP4
/// experts (in the CPU kernels' packed layout, MXFP4 as 4-bit codes with a codebook: the
/// converter's copy of the MXFP4 folder, and llama-quantize's MXFP4_MOE with Q8_0 elsewhere)
/// up to a step where llama.cpp's top-2 margin is below 0.15, as for the other MoE families.
#[test]
fn gguf_files_follow_llama_cpp() {
    for (kind, tie) in [
        ("f32", 0.0),
        ("q8_0", 0.15),
        ("q4_0", 0.15),
        ("mxfp4", 0.15),
        ("mxfp4_moe", 0.15),
    ] {
        assert_follows_llama_cpp(
            &fixture().join(format!("refs/llamacpp-{kind}.json")),
            &fixture().join(format!("gguf/gpt_oss-{kind}.gguf")),
            tie,
            &format!("gpt_oss-{kind}"),
        );
    }
}

/// The layout of the gpt-oss GGUFs in Ollama's library (architecture `gptoss`, its own tensor
/// and key names; `make_ollama_gguf.py` writes it from the MXFP4 GGUF's bytes) reads as
/// llama.cpp's and follows llama.cpp's run of the same weights; its tokenizer is GPT-4o's
/// (`gpt-4o`), as Ollama's loader sets it.
#[test]
fn ollama_s_own_gpt_oss_layout_follows_llama_cpp() {
    let file = fixture().join("gguf/gpt_oss-mxfp4-ollama.gguf");
    assert_follows_llama_cpp(
        &fixture().join("refs/llamacpp-mxfp4.json"),
        &file,
        0.15,
        "gpt_oss-ollama",
    );
    let codec = mlxd::text::TextCodec::from_gguf(&file).expect("codec");
    let mut text = tokenizers::PreTokenizedString::from("HelloWorld I'm 12345\n\nok");
    let pre = codec.tokenizer().get_pre_tokenizer().expect("a pre-tokenizer");
    tokenizers::PreTokenizer::pre_tokenize(pre, &mut text).expect("pre-tokenizes");
    let pieces: Vec<&str> = text
        .get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Char)
        .into_iter()
        .map(|(piece, _, _)| piece)
        .collect();
    // o200k's splits: at the case change, the contraction kept, digits in threes.
    assert_eq!(pieces, ["Hello", "World", "ĠI'm", "Ġ", "123", "45", "ĊĊ", "ok"]);
}

/// A request alone and among 7 others (whose tokens reach other experts, and the same experts
/// in other row counts; sliding and full layers over contexts of other lengths) gets the same
/// greedy tokens.
#[test]
fn routed_experts_and_sinks_are_batch_invariant() {
    let refs = read_json(&fixture().join("refs/transformers-f32.json"));
    let probe = ids(&refs["sequences"][2]["prompt_ids"]);
    let others: Vec<Vec<u32>> = (0..7u32)
        .map(|k| (0..5 + 3 * k).map(|j| 3 + (k * 97 + j * 31) % 500).collect())
        .collect();
    let model = fixture().join("f32");
    let alone = ModelRunner::load(&model, DType::F32, 1, 128).greedy(std::slice::from_ref(&probe), 16);
    let mut batch = vec![probe];
    batch.extend(others);
    let together = ModelRunner::load(&model, DType::F32, 8, 128).greedy(&batch, 16);
    assert_eq!(alone.tokens[0], together.tokens[0], "alone vs among 7 others");
}
