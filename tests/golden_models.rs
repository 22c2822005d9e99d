//! Numerical correctness against references computed by llama2.c and transformers.

mod common;

use candle_core::{DType, Device};
use common::{assert_matches_reference, floats, ids, max_abs_diff, read_json, shared, ModelRunner};

/// The float32 bound the fixtures README recommends (two f32 implementations agree to ~1e-5).
const F32_TOL: f32 = 2e-4;

fn check_stories(folder: &str, dtype: DType, logit_tol: f32, exact_tokens: bool) {
    let dir = shared(&format!("models/{folder}"));
    let reference = read_json(&dir.join("reference.json"));
    let gens = reference["generations"].as_array().expect("generations");
    let prompts: Vec<Vec<u32>> = gens.iter().map(|g| ids(&g["prompt_ids"])).collect();
    let mut runner = ModelRunner::load(&dir, dtype, prompts.len(), 512);
    // All three prompts decoded together in one batch per step.
    let run = runner.greedy(&prompts, 64);
    for (i, g) in gens.iter().enumerate() {
        let want_logits = floats(&g["last_position_logits"]);
        let diff = max_abs_diff(&run.step_logits[i][0], &want_logits);
        assert!(
            diff < logit_tol,
            "{folder} prompt {i}: last-position logits differ by {diff}"
        );
        if exact_tokens {
            assert_eq!(
                run.tokens[i],
                ids(&g["generated_ids"]),
                "{folder} prompt {i}: greedy tokens"
            );
        }
    }
}

#[test]
fn stories260k_reproduces_llama2c_greedy_generations_and_logits() {
    check_stories("stories260k", DType::F32, 1e-4, true);
}

#[test]
fn stories260k_untied_lm_head_matches_the_same_reference() {
    check_stories("stories260k-untied", DType::F32, 1e-4, true);
}

#[test]
fn stories260k_bf16_weights_computed_in_f32_stay_close() {
    // bf16-rounded weights: logits move by rounding, not by bugs (README: compare loosely).
    check_stories("stories260k-bf16", DType::F32, 0.5, false);
}

/// Checks every greedy step of `names` (run together in one batch) against a reference set.
fn check_fixture(arch: &str, folder: &str, set: &str, names: &[&str]) {
    let dir = shared(&format!("fixtures/{arch}/{folder}"));
    let refs = shared(&format!("fixtures/{arch}/refs"));
    let json = read_json(&refs.join(format!("{set}.json")));
    let tensors = candle_core::safetensors::load(refs.join(format!("{set}.safetensors")), &Device::Cpu)
        .expect("reference tensors");
    let all: Vec<&serde_json::Value> = json["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .chain(json["batch"]["members"].as_array().expect("batch members"))
        .collect();
    let seqs: Vec<&serde_json::Value> = names
        .iter()
        .map(|n| *all.iter().find(|s| s["name"] == *n).expect("named sequence"))
        .collect();
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let steps = json["greedy_steps"].as_u64().expect("steps") as usize;
    let run = ModelRunner::load(&dir, DType::F32, prompts.len(), 128).greedy(&prompts, steps);
    let greedy: Vec<Vec<u32>> = seqs.iter().map(|s| ids(&s["greedy_ids"])).collect();
    assert_matches_reference(&run, names, &greedy, &tensors, F32_TOL, &format!("{arch}/{set}"));
}

#[test]
fn llama_fixture_matches_transformers_f32_alone() {
    for name in ["p1", "p7", "p33"] {
        check_fixture("llama", "f32", "transformers-f32", &[name]);
    }
}

#[test]
fn llama_fixture_matches_transformers_f32_batched() {
    check_fixture("llama", "f32", "transformers-f32", &["p1", "p7", "p33", "b0", "b1"]);
}

#[test]
fn mistral_fixture_matches_transformers_f32_batched() {
    check_fixture("mistral", "f32", "transformers-f32", &["p1", "p7", "p33", "b0", "b1"]);
}

#[test]
fn chunked_prefill_equals_one_shot_prefill() {
    let dir = shared("fixtures/llama/f32");
    let prompts = read_json(&shared("fixtures/llama/refs/prompts.json"));
    let p33 = ids(&prompts["sequences"][2]["ids"]);
    let mut one_shot = ModelRunner::load(&dir, DType::F32, 1, 64);
    let want = one_shot.forward(&[(0, 0, p33.clone())]);
    let mut chunked = ModelRunner::load(&dir, DType::F32, 1, 64);
    chunked.forward(&[(0, 0, p33[..10].to_vec())]);
    chunked.forward(&[(0, 10, p33[10..27].to_vec())]);
    let got = chunked.forward(&[(0, 27, p33[27..].to_vec())]);
    let diff = max_abs_diff(&got[0], &want[0]);
    assert!(diff < 1e-5, "chunked prefill differs by {diff}");
}

/// Chunks of similar length in one step take the batched prefill attention (padded, masked),
/// on the CPU too; each chunk's logits equal its own one-sequence forward.
#[test]
fn batched_prefill_chunks_equal_each_chunk_alone() {
    for arch in ["llama", "gemma3"] {
        let dir = shared(&format!("fixtures/{arch}/f32"));
        let prompts = read_json(&shared(&format!("fixtures/{arch}/refs/prompts.json")));
        let p33 = ids(&prompts["sequences"][2]["ids"]);
        // A 12-token chunk after 4 cached tokens, and fresh 12- and 11-token prompts (gemma3's
        // sliding window of 8 masks inside the chunks). Padded work 3·12·16 = 576 is within
        // 1.5x the real 12·16 + 12·12 + 11·11 = 457, so the CPU batches them.
        let chunks = vec![
            (0, 4, p33[4..16].to_vec()),
            (1, 0, p33[..12].to_vec()),
            (2, 0, p33[5..16].to_vec()),
        ];
        let mut together = ModelRunner::load(&dir, DType::F32, 3, 64);
        together.forward(&[(0, 0, p33[..4].to_vec())]);
        let got = together.forward(&chunks);
        for (i, chunk) in chunks.iter().enumerate() {
            let mut alone = ModelRunner::load(&dir, DType::F32, 3, 64);
            if chunk.1 > 0 {
                alone.forward(&[(chunk.0, 0, p33[..chunk.1].to_vec())]);
            }
            let want = alone.forward(std::slice::from_ref(chunk));
            let diff = max_abs_diff(&got[i], &want[0]);
            assert!(diff < 1e-5, "{arch} chunk {i} differs by {diff} when batched");
        }
    }
}

#[test]
fn f16_compute_stays_close_to_the_f32_reference() {
    check_stories("stories260k", DType::F16, 0.1, false);
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let src = shared("models/stories260k");
    let dir_tmp = tempfile::Builder::new()
        .prefix("mlxd-sharded-")
        .tempdir()
        .expect("temp dir");
    let dir = dir_tmp.path();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("load");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: std::collections::HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(file)).expect("save shard");
        for n in part {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let reference = read_json(&src.join("reference.json"));
    let g = &reference["generations"][2];
    let mut runner = ModelRunner::load(dir, DType::F32, 1, 128);
    let run = runner.greedy(&[ids(&g["prompt_ids"])], 64);
    assert_eq!(run.tokens[0], ids(&g["generated_ids"]));
}

const ALL: [&str; 5] = ["p1", "p7", "p33", "b0", "b1"];

#[test]
fn qwen2_fixture_matches_transformers_f32_batched() {
    check_fixture("qwen2", "f32", "transformers-f32", &ALL);
}

#[test]
fn qwen3_fixture_matches_transformers_f32_batched() {
    check_fixture("qwen3", "f32", "transformers-f32", &ALL);
}

#[test]
fn gemma3_fixture_matches_transformers_f32_batched() {
    check_fixture("gemma3", "f32", "transformers-f32", &ALL);
}

#[test]
fn phi3_fixture_matches_transformers_f32_batched() {
    check_fixture("phi3", "f32", "transformers-f32", &ALL);
}

#[test]
fn phi3_longrope_fixture_matches_transformers_f32_batched() {
    check_fixture("phi3-longrope", "f32", "transformers-f32", &ALL);
}

#[test]
fn gemma3_inside_a_multimodal_checkpoint_loads_its_language_model() {
    let src = shared("fixtures/gemma3/f32");
    let dir_tmp = tempfile::Builder::new()
        .prefix("mlxd-gemma3-mm-")
        .tempdir()
        .expect("temp dir");
    let dir = dir_tmp.path();
    let text_config = read_json(&src.join("config.json"));
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config,
        "vision_config": {"model_type": "siglip_vision_model"},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("load");
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replacen("model.", "model.language_model.", 1), v))
        .collect();
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).expect("save");
    let refs = read_json(&shared("fixtures/gemma3/refs/transformers-f32.json"));
    let p33 = &refs["sequences"][2];
    let mut runner = ModelRunner::load(dir, DType::F32, 1, 128);
    let run = runner.greedy(&[ids(&p33["prompt_ids"])], 32);
    assert_eq!(run.tokens[0], ids(&p33["greedy_ids"]));
}

const MLX_ARCHS: [&str; 6] = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"];

/// Sequences of a reference set by name, and its step logits.
fn reference_set(
    arch: &str,
    set: &str,
) -> (
    Vec<serde_json::Value>,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let refs = shared(&format!("fixtures/{arch}/refs"));
    let json = read_json(&refs.join(format!("{set}.json")));
    let seqs = json["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .chain(json["batch"]["members"].as_array().expect("batch members"))
        .cloned()
        .collect();
    let tensors = candle_core::safetensors::load(refs.join(format!("{set}.safetensors")), &Device::Cpu)
        .expect("reference tensors");
    (seqs, tensors)
}

/// The steps of each sequence (in `ALL` order) where mlx-lm's native compute (`native`: bf16
/// activations) still followed the tokens of the exactly dequantized model computed in f32
/// (`exact`): its logits there are comparable with the exact ones.
fn shared_steps(arch: &str, native: &str, exact: &str) -> Vec<usize> {
    let (n_seqs, _) = reference_set(arch, native);
    let (e_seqs, _) = reference_set(arch, exact);
    ALL.iter()
        .map(|name| {
            let find = |seqs: &[serde_json::Value]| {
                ids(&seqs.iter().find(|s| s["name"] == *name).expect("named")["greedy_ids"])
            };
            let (n_ids, e_ids) = (find(&n_seqs), find(&e_seqs));
            // Logits of the first differing step still came from the same prefix.
            (n_ids.iter().zip(&e_ids).take_while(|(a, b)| a == b).count() + 1).min(n_ids.len())
        })
        .collect()
}

/// The largest logit difference from `exact` over the first `steps[i]` steps of sequence i.
fn deviation(
    got: &[Vec<Vec<f32>>],
    exact: &std::collections::HashMap<String, candle_core::Tensor>,
    steps: &[usize],
) -> f32 {
    let mut worst = 0f32;
    for ((name, rows), &n) in ALL.iter().zip(got).zip(steps) {
        let want = exact[&format!("{name}.step_logits")].to_vec2::<f32>().expect("logits");
        for (g, w) in rows.iter().zip(&want).take(n) {
            worst = worst.max(max_abs_diff(g, w));
        }
    }
    worst
}

/// mlxd multiplies MLX weights with int8-quantized activations (as llama.cpp does for GGUF), so
/// it is held to mlx-lm's own standard: teacher-forced along the exact reference's tokens, its
/// logits stay at least as close to the exactly dequantized f32 model as mlx-lm's native compute
/// does over the same steps. Checked with an f32 KV cache and with the f16 one the server keeps
/// for quantized weights on the CPU.
fn check_mlx_folder(arch: &str, folder: &str) {
    let exact_set = format!("{folder}-f32");
    let steps = shared_steps(arch, folder, &exact_set);
    let (seqs, exact) = reference_set(arch, &exact_set);
    let (_, native) = reference_set(arch, folder);
    let named: Vec<&serde_json::Value> = ALL
        .iter()
        .map(|n| seqs.iter().find(|s| s["name"] == *n).expect("named"))
        .collect();
    let prompts: Vec<Vec<u32>> = named.iter().map(|s| ids(&s["prompt_ids"])).collect();
    let followed: Vec<Vec<u32>> = named.iter().map(|s| ids(&s["greedy_ids"])).collect();
    let native_rows: Vec<Vec<Vec<f32>>> = ALL
        .iter()
        .map(|n| native[&format!("{n}.step_logits")].to_vec2::<f32>().expect("logits"))
        .collect();
    let bound = deviation(&native_rows, &exact, &steps);
    let dir = shared(&format!("fixtures/{arch}/{folder}"));
    for kv_dtype in [DType::F32, DType::F16] {
        let mut runner = ModelRunner::load(&dir, DType::F32, prompts.len(), 128).with_kv_dtype(kv_dtype);
        let got = runner.forced(&prompts, &followed);
        let ours = deviation(&got, &exact, &steps);
        let all_steps = deviation(&got, &exact, &[usize::MAX; 5]);
        eprintln!(
            "{arch}/{folder} ({kv_dtype:?} KV): mlxd {ours:.3} (all 32 steps {all_steps:.3}) vs mlx-lm native {bound:.3}"
        );
        assert!(
            ours <= bound,
            "{arch}/{folder} ({kv_dtype:?} KV): logits {ours} from exact, mlx-lm's own compute {bound}"
        );
    }
}

#[test]
fn mlx_4bit_folders_stay_as_close_to_exact_as_mlx_lm() {
    for arch in MLX_ARCHS {
        check_mlx_folder(arch, "mlx-q4");
    }
}

#[test]
fn mlx_8bit_folders_stay_as_close_to_exact_as_mlx_lm() {
    for arch in MLX_ARCHS {
        check_mlx_folder(arch, "mlx-q8");
    }
}

#[test]
fn mlx_mixed_3_and_6_bit_folder_stays_as_close_to_exact_as_mlx_lm() {
    check_mlx_folder("llama", "mlx-mixed-3-6");
}

#[test]
fn quantized_folders_report_their_format_and_true_parameter_count() {
    let load = |folder: &str| {
        mlxd::models::load(
            &shared(&format!("fixtures/llama/{folder}")),
            None,
            &Device::Cpu,
            DType::F32,
            mlxd::compute::Numerics::Fastest,
            &mlxd::formats::LoadProgress::hidden(),
        )
        .expect("loads")
        .config()
        .clone()
    };
    let dense = load("f32");
    for (folder, label) in [
        ("f32", "F32"),
        ("bf16", "BF16"),
        ("mlx-q4", "MLX-4bit-g64"),
        ("mlx-q8", "MLX-8bit-g64"),
    ] {
        let c = load(folder);
        assert_eq!(c.weights.dtype, label, "{folder}");
        assert_eq!(c.num_params, dense.num_params, "{folder} counts unpacked parameters");
    }
}
