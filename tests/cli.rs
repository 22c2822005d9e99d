//! The `mlxd` binary: `run` output, `--help`, and load failures that name the file.

mod common;

use std::path::Path;
use std::process::Command;

use common::{read_json, repo_model, shared};

fn mlxd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlxd"))
}

/// A fresh temp folder (removed when dropped) named for the test.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("mlxd-cli-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// A copy of the folder `src` in a temp folder (removed when dropped), for corrupting.
fn folder_copy(src: &Path, name: &str) -> tempfile::TempDir {
    let dir = temp_dir(name);
    for entry in std::fs::read_dir(src).expect("source dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// A copy of the repository model in a temp folder, for corrupting.
fn model_copy(name: &str) -> tempfile::TempDir {
    folder_copy(&repo_model(), name)
}

fn run_fails_with(model: &Path, needles: &[&str]) {
    let out = mlxd()
        .args(["run", "--model"])
        .arg(model)
        .arg("hi")
        .output()
        .expect("runs");
    assert!(!out.status.success(), "must exit non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}:\n{stderr}");
    }
}

/// stdout carries the generated text alone (no prompt, no log line), so it can be piped.
#[test]
fn run_streams_the_reference_continuation() {
    let reference = read_json(&shared("models/stories260k/reference.json"));
    let g = &reference["generations"][1];
    let out = mlxd()
        .args(["run", "--model"])
        .arg(repo_model())
        .args(["--max-tokens", "64", "Once upon a time"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let want = format!("{}\n", g["generated_text"].as_str().expect("text"));
    assert_eq!(stdout, want);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {stderr}"
    );
}

#[test]
fn serve_help_explains_every_flag() {
    let out = mlxd().args(["serve", "--help"]).output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--host",
        "--port",
        "--config",
        "--max-seqs",
        "--kv-memory",
        "--api-key",
        "--cors-origin",
        "--shutdown-timeout",
        "--max-body",
        "--read-timeout",
        "--max-queue",
        "--queue-timeout",
        "--default-max-tokens",
        "--no-ui",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains(".gguf"), "--model says a GGUF file works too:\n{help}");
}

#[test]
fn run_help_lists_no_serve_only_flags() {
    let out = mlxd().args(["run", "--help"]).output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--model") && help.contains("--max-tokens"), "{help}");
    for flag in [
        "--max-queue",
        "--queue-timeout",
        "--default-max-tokens",
        "--port",
        "--api-key",
        "--no-ui",
    ] {
        assert!(!help.contains(flag), "{flag} is a serve flag:\n{help}");
    }
}

#[test]
fn list_with_nothing_to_serve_says_where_it_looked() {
    let empty_tmp = temp_dir("empty");
    let empty = empty_tmp.path();
    let out = mlxd()
        .args(["list", "--models-dir"])
        .arg(empty)
        .arg("--ollama-models")
        .arg(empty.join("ollama"))
        .arg("--hf-cache")
        .arg(empty.join("hf"))
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("No models found."), "{text}");
    for place in [empty.display().to_string(), empty.join("ollama").display().to_string()] {
        assert!(text.contains(&place), "{place} in:\n{text}");
    }
}

#[test]
fn a_symlinked_model_in_models_dir_is_served_under_the_link_s_name() {
    let dir_tmp = temp_dir("links");
    let dir = dir_tmp.path();
    let target = std::fs::canonicalize(repo_model()).expect("model");
    std::os::unix::fs::symlink(&target, dir.join("tiny")).expect("link");
    std::os::unix::fs::symlink(&target, dir.join("tiny-again")).expect("link");
    let out = mlxd()
        .args(["list", "--model"])
        .arg(repo_model())
        .arg("--models-dir")
        .arg(dir)
        .arg("--ollama-models")
        .arg(dir.join("no-store"))
        .arg("--hf-cache")
        .arg(dir.join("no-cache"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["stories260k", "tiny", "tiny-again"], "{text}");
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    run_fails_with(Path::new("/nonexistent/model"), &["/nonexistent/model"]);
}

#[test]
fn missing_tokenizer_is_named() {
    let dir_tmp = model_copy("notok");
    let dir = dir_tmp.path();
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    run_fails_with(dir, &["tokenizer.json", "not found"]);
}

#[test]
fn malformed_config_is_named() {
    let dir_tmp = model_copy("badcfg");
    let dir = dir_tmp.path();
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").expect("write");
    run_fails_with(dir, &["config.json"]);
}

#[test]
fn truncated_weights_are_named() {
    let dir_tmp = model_copy("trunc");
    let dir = dir_tmp.path();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    run_fails_with(dir, &["model.safetensors"]);
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let dir_tmp = model_copy("arch");
    let dir = dir_tmp.path();
    let cfg = std::fs::read_to_string(dir.join("config.json")).expect("read");
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "MambaForCausalLM"),
    )
    .expect("write");
    run_fails_with(dir, &["MambaForCausalLM", "LlamaForCausalLM"]);
}

/// A copy of a shared fixture folder in a temp folder, for corrupting.
fn fixture_copy(rel: &str, name: &str) -> tempfile::TempDir {
    folder_copy(&shared(rel), name)
}

#[test]
fn unsupported_quantization_is_named_with_the_supported_list() {
    let dir_tmp = fixture_copy("fixtures/llama/mlx-q4", "nvfp4");
    let dir = dir_tmp.path();
    let cfg = std::fs::read_to_string(dir.join("config.json")).expect("read");
    std::fs::write(dir.join("config.json"), cfg.replace("\"affine\"", "\"nvfp4\"")).expect("write");
    run_fails_with(dir, &["nvfp4", "MLX affine-quantized"]);
    let gptq_tmp = model_copy("gptq");
    let gptq = gptq_tmp.path();
    let cfg = std::fs::read_to_string(gptq.join("config.json")).expect("read");
    let cfg = cfg.replacen(
        '{',
        "{\"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4},",
        1,
    );
    std::fs::write(gptq.join("config.json"), cfg).expect("write");
    run_fails_with(gptq, &["gptq", "supported"]);
}

#[test]
fn truncated_quantized_weights_are_named() {
    let dir_tmp = fixture_copy("fixtures/qwen3/mlx-q4", "mlxtrunc");
    let dir = dir_tmp.path();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    run_fails_with(dir, &["model.safetensors"]);
}

#[test]
fn a_tensor_of_the_wrong_dtype_is_a_clear_error() {
    let dir_tmp = model_copy("dtype");
    let dir = dir_tmp.path();
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).expect("load");
    let name = "model.layers.0.self_attn.q_proj.weight";
    let as_u8 = tensors[name].to_dtype(candle_core::DType::U8).expect("cast");
    tensors.insert(name.to_string(), as_u8);
    candle_core::safetensors::save(&tensors, &path).expect("save");
    run_fails_with(dir, &["model.safetensors"]);
}

#[test]
fn truncated_and_foreign_gguf_files_are_named() {
    let dir_tmp = temp_dir("gguf");
    let dir = dir_tmp.path();
    let bytes = std::fs::read(shared("fixtures/gguf/qwen3-q4_0.gguf")).expect("read");
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    run_fails_with(&truncated, &["truncated.gguf", "truncated"]);
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"definitely not gguf").expect("write");
    run_fails_with(&garbage, &["garbage.gguf"]);
}

/// A context longer than the model was trained for is refused at start, naming the trained
/// length and how to extend it, never capped silently.
#[test]
fn a_max_model_len_beyond_the_trained_context_is_refused() {
    let out = mlxd()
        .args(["run", "--model"])
        .arg(repo_model())
        .args(["--max-model-len", "32768", "hi"])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "must exit non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in ["--max-model-len 32768", "trained context of 512 tokens", "rope_scaling"] {
        assert!(stderr.contains(needle), "stderr should mention {needle:?}:\n{stderr}");
    }
    let ok = mlxd()
        .args(["run", "--model"])
        .arg(repo_model())
        .args(["--max-model-len", "512", "--max-tokens", "2", "Once"])
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
