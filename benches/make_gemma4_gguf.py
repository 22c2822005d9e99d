#!/usr/bin/env python3
"""Write a Q4_0 GGUF of a Gemma 4 E2B-shaped model with random weights, for speed benchmarks of
mlxd's Gemma 4 path against llama-server on the same file.

Usage (bench venv with `pip install numpy gguf`):
  python benches/make_gemma4_gguf.py --tokenizer-dir ../shared/tokenizers/qwen2.5 --out PREFIX
writes PREFIX-q4_0.gguf with llama.cpp's `gemma4` tensor names and metadata, in E2B's shape:
hidden 1536, 35 layers of 8 query heads (sliding layers: one KV head of 256, window 512; every
fifth layer global: one KV head of 512, proportional rope turning a quarter of it), the last 20
layers reading the KV of layers 13 and 14 with MLPs twice as wide (6144 → 12288), per-layer
input embeddings of 256 per layer, a vocabulary of 262,144 (Qwen2.5's tokenizer padded, so
both servers tokenize alike). Weights are N(0, 1/fan_in), norms 1, tables N(0, 1);
quantization is gguf-py's reference implementation, done in row chunks (the per-layer table
alone is 2.35 billion values), 1-D tensors stay F32 as llama-quantize leaves them.
"""
import argparse
import json

import gguf
import numpy as np

from make_gguf import add_tokenizer

SHAPE = dict(hidden=1536, layers=35, heads=8, head_dim=256, global_head_dim=512, ffn=6144, shared=20,
             per_layer=256, vocab=262144, window=512, context=32768)
CHUNK_ROWS = 8192


def is_global(i):
    return i % 5 == 4


def tensors(s, rng):
    """(GGUF name, producer of a float32 array in HF row-major [out, in] order, rows) of every
    tensor; producers make `rows` rows at a time."""
    h, L, pl = s["hidden"], s["layers"], s["per_layer"]
    first_shared = L - s["shared"]
    lin = lambda out, inp: (lambda n: rng.standard_normal((n, inp), dtype=np.float32) / np.sqrt(inp), out)
    table = lambda out, inp: (lambda n: rng.standard_normal((n, inp), dtype=np.float32), out)
    ones = lambda n: (lambda _: np.ones(n, np.float32), None)
    yield "token_embd.weight", *table(s["vocab"], h)
    yield "per_layer_token_embd.weight", *table(s["vocab"], L * pl)
    yield "per_layer_model_proj.weight", *lin(L * pl, h)
    yield "per_layer_proj_norm.weight", *ones(pl)
    rotated = s["global_head_dim"] // 8
    freqs = np.array([1.0] * rotated + [1e30] * (s["global_head_dim"] // 2 - rotated), np.float32)
    yield "rope_freqs.weight", (lambda _: freqs), None
    for i in range(L):
        b = f"blk.{i}"
        d = s["global_head_dim"] if is_global(i) else s["head_dim"]
        ffn = s["ffn"] * (2 if i >= first_shared else 1)
        yield f"{b}.attn_norm.weight", *ones(h)
        yield f"{b}.attn_q.weight", *lin(s["heads"] * d, h)
        if i < first_shared:
            yield f"{b}.attn_k.weight", *lin(d, h)
            yield f"{b}.attn_v.weight", *lin(d, h)
            yield f"{b}.attn_k_norm.weight", *ones(d)
        yield f"{b}.attn_q_norm.weight", *ones(d)
        yield f"{b}.attn_output.weight", *lin(h, s["heads"] * d)
        yield f"{b}.post_attention_norm.weight", *ones(h)
        yield f"{b}.ffn_norm.weight", *ones(h)
        yield f"{b}.ffn_gate.weight", *lin(ffn, h)
        yield f"{b}.ffn_up.weight", *lin(ffn, h)
        yield f"{b}.ffn_down.weight", *lin(h, ffn)
        yield f"{b}.post_ffw_norm.weight", *ones(h)
        yield f"{b}.layer_output_scale.weight", (lambda _: np.ones(1, np.float32)), None
        yield f"{b}.inp_gate.weight", *lin(pl, h)
        yield f"{b}.proj.weight", *lin(h, pl)
        yield f"{b}.post_norm.weight", *ones(h)
    yield "output_norm.weight", *ones(h)


def write(out, qtype, s, tok, tok_cfg, seed):
    w = gguf.GGUFWriter(out, "gemma4")
    L, first_shared = s["layers"], s["layers"] - s["shared"]
    w.add_block_count(L)
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length([s["ffn"] * (2 if i >= first_shared else 1) for i in range(L)])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(1)
    w.add_key_length(s["global_head_dim"])
    w.add_value_length(s["global_head_dim"])
    w.add_uint32("gemma4.attention.key_length_swa", s["head_dim"])
    w.add_uint32("gemma4.attention.value_length_swa", s["head_dim"])
    w.add_rope_dimension_count(s["global_head_dim"])
    w.add_uint32("gemma4.rope.dimension_count_swa", s["head_dim"])
    w.add_rope_freq_base(1e6)
    w.add_float32("gemma4.rope.freq_base_swa", 1e4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(s["window"])
    w.add_array("gemma4.attention.sliding_window_pattern", [not is_global(i) for i in range(L)])
    w.add_uint32("gemma4.attention.shared_kv_layers", s["shared"])
    w.add_uint32("gemma4.embedding_length_per_layer_input", s["per_layer"])
    w.add_float32("gemma4.final_logit_softcapping", 30.0)
    add_tokenizer(w, tok, tok_cfg, s["vocab"])
    rng = np.random.default_rng(seed)
    for name, make, rows in tensors(s, rng):
        if rows is None:
            w.add_tensor(name, make(None))
            continue
        parts = [gguf.quants.quantize(make(min(CHUNK_ROWS, rows - r)), qtype) for r in range(0, rows, CHUNK_ROWS)]
        q = np.concatenate(parts)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        print(name, q.shape, flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True, help="prefix of the file written")
    a = p.parse_args()
    tok = json.load(open(f"{a.tokenizer_dir}/tokenizer.json"))
    tok_cfg = json.load(open(f"{a.tokenizer_dir}/tokenizer_config.json"))
    write(f"{a.out}-q4_0.gguf", gguf.GGMLQuantizationType.Q4_0, SHAPE, tok, tok_cfg, seed=0)
    print("wrote", f"{a.out}-q4_0.gguf")


if __name__ == "__main__":
    main()
