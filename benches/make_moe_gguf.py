#!/usr/bin/env python3
"""Write Q8_0 and Q4_0 GGUF files of a Qwen3-MoE-shaped model with random weights, for speed
benchmarks of mlxd's mixture-of-experts path against llama-server on the same files.

Usage (bench venv with `pip install numpy gguf`):
  python benches/make_moe_gguf.py --tokenizer-dir ../shared/tokenizers/qwen2.5 --out PREFIX [--layers 8]
writes PREFIX-q8_0.gguf and PREFIX-q4_0.gguf with llama.cpp's `qwen3moe` tensor names and
metadata (`--kinds q8_0` writes one). `--hf-bf16 DIR` also writes the same weights as a Hugging
Face Qwen3-MoE folder in bf16 (needs torch and safetensors). `--distinct-experts N` makes each
layer's experts N random matrices repeated (every expert is still stored, and read, on its own;
only the values repeat), so a full-width file takes seconds instead of minutes to make: for
speed benchmarks, not for numerics. The default shape is Qwen3-30B-A3B's widths (hidden 2048, 32 query and 4 KV heads of
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


def tensors(shape, layers, rng, distinct):
    """(GGUF name, float32 array in HF row-major [out, in] order) of every tensor; each
    layer's stacked experts come as `distinct` matrices that `experts()` repeats."""
    h, d, e, f = shape["hidden"], shape["head_dim"], shape["experts"], shape["expert_ffn"]
    n = distinct or e
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
        yield f"{b}.ffn_gate_exps.weight", lin(f, h, n)
        yield f"{b}.ffn_up_exps.weight", lin(f, h, n)
        yield f"{b}.ffn_down_exps.weight", lin(h, f, n)
    yield "output_norm.weight", np.ones(h, np.float32)
    yield "output.weight", lin(shape["vocab"], h)


def experts(data, shape):
    """A stacked expert array of `distinct` matrices repeated to the shape's expert count."""
    return data[np.arange(shape["experts"]) % len(data)]


def write(out, qtype, shape, layers, tok, tok_cfg, weights):
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
    for name, data in weights:
        if data.ndim == 1:
            w.add_tensor(name, data)
        else:
            q = gguf.quants.quantize(data, qtype)  # the distinct experts, then repeated
            q = experts(q, shape) if "_exps" in name else q
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"}


def write_hf(out, shape, layers, tokenizer_dir, tok_cfg, weights):
    """The same weights as a Hugging Face Qwen3-MoE folder in bf16 (one safetensors file)."""
    import os
    import shutil

    import torch
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    bf16 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16)
    hf = {}
    for name, data in weights:
        if name == "token_embd.weight":
            hf["model.embed_tokens.weight"] = bf16(data)
        elif name == "output_norm.weight":
            hf["model.norm.weight"] = bf16(data)
        elif name == "output.weight":
            hf["lm_head.weight"] = bf16(data)
        else:
            _, layer, kind, _ = name.split(".")
            prefix = f"model.layers.{layer}"
            if kind.endswith("_exps"):
                proj = kind.split("_")[1] + "_proj"
                for e in range(shape["experts"]):
                    hf[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = bf16(data[e % len(data)])
            else:
                hf[f"{prefix}.{HF_NAMES[kind]}.weight"] = bf16(data)
    save_file(hf, f"{out}/model.safetensors", metadata={"format": "pt"})
    eos = tok_cfg.get("eos_token")
    config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=shape["vocab"],
                  hidden_size=shape["hidden"], num_hidden_layers=layers, num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], intermediate_size=6144,
                  moe_intermediate_size=shape["expert_ffn"], num_experts=shape["experts"],
                  num_experts_per_tok=shape["experts_per_tok"], norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], max_position_embeddings=shape["context"], rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16")
    json.dump(config, open(f"{out}/config.json", "w"), indent=1)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(f"{tokenizer_dir}/{f}", out)
    print("wrote", out, "eos", eos)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True, help="prefix of the files written")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kinds", default="q8_0,q4_0", help="GGUF files to write (q8_0, q4_0)")
    p.add_argument("--hf-bf16", default=None, help="also write the weights as a bf16 Hugging Face folder here")
    p.add_argument("--distinct-experts", type=int, default=0, help="random matrices per layer's experts (0: all)")
    a = p.parse_args()
    tok = json.load(open(f"{a.tokenizer_dir}/tokenizer.json"))
    tok_cfg = json.load(open(f"{a.tokenizer_dir}/tokenizer_config.json"))
    weights = list(tensors(SHAPE, a.layers, np.random.default_rng(0), a.distinct_experts))
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for suffix in filter(None, a.kinds.split(",")):
        write(f"{a.out}-{suffix}.gguf", qtypes[suffix], SHAPE, a.layers, tok, tok_cfg, weights)
        print("wrote", f"{a.out}-{suffix}.gguf")
    if a.hf_bf16:
        write_hf(a.hf_bf16, SHAPE, a.layers, a.tokenizer_dir, tok_cfg, weights)


if __name__ == "__main__":
    main()
