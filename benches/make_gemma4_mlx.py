#!/usr/bin/env python3
"""Write an MLX 4-bit folder of a Gemma 4 E2B-shaped model with random weights, the MLX row of
the Gemma 4 speed benchmark (against llama-server on benches/make_gemma4_gguf.py's Q4_0 file).

Usage (bench venv with `pip install numpy safetensors`):
  python benches/make_gemma4_mlx.py --tokenizer-dir ../shared/tokenizers/qwen2.5 --out DIR
writes DIR as `mlx_lm.convert -q` lays out a `gemma4_text` model (affine 4-bit, groups of 64,
f16 scales and biases; every matrix and table quantized, norms f16), in the shape of
make_gemma4_gguf.py's SHAPE, with Qwen2.5's tokenizer (the GGUF pads the same vocabulary, so
both servers tokenize alike). The weights are random 4-bit codes with per-group scales of
about 1/(4·sqrt(fan_in)) and biases centring them, so activations stay O(1); no float matrix
is made, which keeps the 2.35-billion-value per-layer table cheap to write.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from make_gemma4_gguf import SHAPE, is_global

GROUP = 64


def packed(rng, out, inp, unit):
    """An affine 4-bit matrix `[out, inp]` as MLX stores it: codes 8 per u32 word, and f16
    scales and biases per group of 64, for values of about `unit`."""
    words = rng.integers(0, 2**32, size=(out, inp // 8), dtype=np.uint64).astype(np.uint32)
    scales = np.full((out, inp // GROUP), unit / 4.0, np.float16)
    biases = np.full((out, inp // GROUP), -8 * unit / 4.0, np.float16)
    return words, scales, biases


def write(out, s, tok_dir, seed):
    rng = np.random.default_rng(seed)
    h, L, pl = s["hidden"], s["layers"], s["per_layer"]
    first_shared = L - s["shared"]
    shard, tensors, index = 0, {}, {}

    def flush():
        nonlocal shard, tensors
        if tensors:
            name = f"model-{shard:05d}.safetensors"
            save_file(tensors, str(out / name), metadata={"format": "mlx"})
            index.update({k: name for k in tensors})
            shard, tensors = shard + 1, {}

    def matrix(name, rows, cols, unit):
        w, sc, b = packed(rng, rows, cols, unit)
        tensors.update({f"{name}.weight": w, f"{name}.scales": sc, f"{name}.biases": b})
        if sum(t.nbytes for t in tensors.values()) > 2**30:
            flush()

    def norm(name, n):
        tensors[f"{name}.weight"] = np.ones(n, np.float16)

    matrix("model.embed_tokens", s["vocab"], h, 1.0)
    matrix("model.embed_tokens_per_layer", s["vocab"], L * pl, 1.0)
    matrix("model.per_layer_model_projection", L * pl, h, h**-0.5)
    norm("model.per_layer_projection_norm", pl)
    for i in range(L):
        p = f"model.layers.{i}"
        d = s["global_head_dim"] if is_global(i) else s["head_dim"]
        ffn = s["ffn"] * (2 if i >= first_shared else 1)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "post_per_layer_input_norm"):
            norm(f"{p}.{n}", h)
        tensors[f"{p}.layer_scalar"] = np.ones(1, np.float16)
        matrix(f"{p}.self_attn.q_proj", s["heads"] * d, h, h**-0.5)
        norm(f"{p}.self_attn.q_norm", d)
        if i < first_shared:
            matrix(f"{p}.self_attn.k_proj", d, h, h**-0.5)
            matrix(f"{p}.self_attn.v_proj", d, h, h**-0.5)
            norm(f"{p}.self_attn.k_norm", d)
        matrix(f"{p}.self_attn.o_proj", h, s["heads"] * d, (s["heads"] * d) ** -0.5)
        matrix(f"{p}.mlp.gate_proj", ffn, h, h**-0.5)
        matrix(f"{p}.mlp.up_proj", ffn, h, h**-0.5)
        matrix(f"{p}.mlp.down_proj", h, ffn, ffn**-0.5)
        matrix(f"{p}.per_layer_input_gate", pl, h, h**-0.5)
        matrix(f"{p}.per_layer_projection", h, pl, pl**-0.5)
    norm("model.norm", h)
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    layer_types = ["full_attention" if is_global(i) else "sliding_attention" for i in range(L)]
    config = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "hidden_size": h,
        "intermediate_size": s["ffn"], "num_hidden_layers": L, "num_attention_heads": s["heads"],
        "num_key_value_heads": 1, "head_dim": s["head_dim"], "global_head_dim": s["global_head_dim"],
        "layer_types": layer_types, "num_kv_shared_layers": s["shared"], "use_double_wide_mlp": True,
        "hidden_size_per_layer_input": pl, "vocab_size_per_layer_input": s["vocab"], "vocab_size": s["vocab"],
        "sliding_window": s["window"], "final_logit_softcapping": 30.0, "max_position_embeddings": s["context"],
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
        "eos_token_id": 151645, "bos_token_id": 151643,
        "quantization": {"group_size": GROUP, "bits": 4, "mode": "affine"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tok_dir) / f, out / f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out, SHAPE, a.tokenizer_dir, seed=0)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
