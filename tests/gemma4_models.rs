//! Gemma 4 text against transformers 5.25's float32 references
//! (`tests/data/gemma4/make_fixtures.py`): the dense E2B shape (per-layer inputs, layers reading
//! shared KV, double-wide MLPs, global layers with their own head width and proportional rope)
//! and the 26B-A4B shape (experts beside the dense MLP, values equal to keys, the multimodal
//! checkpoint's tensor names), every greedy step's logits and ids, batched.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{ids, max_abs_diff, read_json, ModelRunner};

/// These fixtures amplify float32 rounding more than the other families' (six sandwich-normed
/// layers with double-wide MLPs and per-layer inputs): transformers' own float32 logits differ
/// from its float64 ones by up to 1.5e-4 (median 3e-5), and mlxd's from transformers' float32
/// by up to 3e-4 (median 3e-5). A wrong scale, norm or slice gives 1e-2 and more; the greedy
/// margins are ≥ 1.6e-2.
const F32_TOL: f32 = 5e-4;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gemma4")
        .join(variant)
}

/// Every prompt of transformers' f32 set through the `variant`'s folder, together in one batch
/// per step: the greedy ids and every step's logits.
fn check_against_transformers(variant: &str) {
    let refs = fixture(variant).join("refs");
    let json = read_json(&refs.join("transformers-f32.json"));
    let tensors = candle_core::safetensors::load(refs.join("transformers-f32.safetensors"), &Device::Cpu)
        .expect("reference tensors");
    let seqs = json["sequences"].as_array().expect("sequences");
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let steps = json["greedy_steps"].as_u64().expect("steps") as usize;
    let mut runner = ModelRunner::load(&fixture(variant).join("f32"), DType::F32, prompts.len(), 128);
    let run = runner.greedy(&prompts, steps);
    for (i, seq) in seqs.iter().enumerate() {
        let name = seq["name"].as_str().expect("name");
        assert_eq!(
            run.tokens[i],
            ids(&seq["greedy_ids"]),
            "{variant} {name}: greedy tokens"
        );
        let want = tensors[&format!("{name}.step_logits")]
            .to_vec2::<f32>()
            .expect("step logits");
        for (step, (got, want)) in run.step_logits[i].iter().zip(&want).enumerate() {
            let diff = max_abs_diff(got, want);
            assert!(diff < F32_TOL, "{variant} {name} step {step}: logits differ by {diff}");
        }
    }
}

#[test]
fn gemma4_dense_matches_transformers_f32_batched() {
    check_against_transformers("dense");
}

#[test]
fn gemma4_moe_matches_transformers_f32_batched() {
    check_against_transformers("moe");
}
