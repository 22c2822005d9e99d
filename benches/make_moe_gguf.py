#!/usr/bin/env python3
"""Write Q8_0 and Q4_0 GGUF files of a Qwen3-MoE-shaped model with random weights, for speed
benchmarks of mlxd's mixture-of-experts path against llama-server on the same files.

Usage (bench venv with `pip install numpy gguf`):
  python benches/make_moe_gguf.py --tokenizer-dir ../shared/tokenizers/qwen2.5 --out PREFIX [--layers 8]
writes PREFIX-q8_0.gguf and PREFIX-q4_0.gguf with llama.cpp's `qwen3moe` tensor names and
metadata. The default shape is Qwen3-30B-A3B's widths (hidden 2048, 32 query and 4 KV heads of
128, 128 experts of 768 of which 8 per token, vocabulary 151,936) with `--layers` of its 48
layers. Weights are N(0, 1/fan_in), norms 1, so activations stay O(1) and routing is spread;
quantization is gguf-py's reference implementation, 1-D tensors stay F32 as llama-quantize
leaves them.
"""
import argparse
import json

import gguf
import numpy as np

from make_gguf import add_tokenizer

SHAPE = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, experts_per_tok=8, expert_ffn=768,
             vocab=151936, context=40960)


def tensors(shape, layers, rng):
    """(GGUF name, float32 array in HF row-major [out, in] order) of every tensor."""
    h, d, e, f = shape["hidden"], shape["head_dim"], shape["experts"], shape["expert_ffn"]
    q, kv = shape["heads"] * d, shape["kv_heads"] * d
    lin = lambda out, inp, *lead: (rng.standard_normal((*lead, out, inp), dtype=np.float32) / np.sqrt(inp))
    yield "token_embd.weight", rng.standard_normal((shape["vocab"], h), dtype=np.float32)
    for i in range(layers):
        b = f"blk.{i}"
        yield f"{b}.attn_norm.weight", np.ones(h, np.float32)
        yield f"{b}.attn_q.weight", lin(q, h)
        yield f"{b}.attn_k.weight", lin(kv, h)
        yield f"{b}.attn_v.weight", lin(kv, h)
        yield f"{b}.attn_output.weight", lin(h, q)
        yield f"{b}.attn_q_norm.weight", np.ones(d, np.float32)
        yield f"{b}.attn_k_norm.weight", np.ones(d, np.float32)
        yield f"{b}.ffn_norm.weight", np.ones(h, np.float32)
        yield f"{b}.ffn_gate_inp.weight", lin(e, h)
        yield f"{b}.ffn_gate_exps.weight", lin(f, h, e)
        yield f"{b}.ffn_up_exps.weight", lin(f, h, e)
        yield f"{b}.ffn_down_exps.weight", lin(h, f, e)
    yield "output_norm.weight", np.ones(h, np.float32)
    yield "output.weight", lin(shape["vocab"], h)


def write(out, qtype, shape, layers, tok, tok_cfg, seed):
    w = gguf.GGUFWriter(out, "qwen3moe")
    w.add_block_count(layers)
    w.add_context_length(shape["context"])
    w.add_embedding_length(shape["hidden"])
    w.add_feed_forward_length(6144)
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_key_length(shape["head_dim"])
    w.add_value_length(shape["head_dim"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(shape["experts"])
    w.add_expert_used_count(shape["experts_per_tok"])
    w.add_expert_feed_forward_length(shape["expert_ffn"])
    add_tokenizer(w, tok, tok_cfg, shape["vocab"])
    for name, data in tensors(shape, layers, np.random.default_rng(seed)):
        if data.ndim == 1:
            w.add_tensor(name, data)
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True, help="prefix of the files written")
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    tok = json.load(open(f"{a.tokenizer_dir}/tokenizer.json"))
    tok_cfg = json.load(open(f"{a.tokenizer_dir}/tokenizer_config.json"))
    for suffix, qtype in [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        write(f"{a.out}-{suffix}.gguf", qtype, SHAPE, a.layers, tok, tok_cfg, seed=0)
        print("wrote", f"{a.out}-{suffix}.gguf")


if __name__ == "__main__":
    main()
