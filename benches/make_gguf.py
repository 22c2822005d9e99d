#!/usr/bin/env python3
"""Write GGUF versions (F16, Q8_0, Q4_0) of a Qwen2-shaped Hugging Face folder, for speed
benchmarks of mlxd's GGUF path (no llama.cpp checkout is reachable here).

Usage (bench venv with `pip install numpy gguf`):
  python benches/make_gguf.py MODEL_DIR OUT_PREFIX
writes OUT_PREFIX-f16.gguf, OUT_PREFIX-q8_0.gguf and OUT_PREFIX-q4_0.gguf with llama.cpp's
tensor names, `qwen2` metadata and the byte-level BPE vocabulary of tokenizer.json
(`tokenizer.ggml.pre = qwen2`). Quantization is gguf-py's reference implementation; 1-D
tensors (norms, biases) stay F32, as llama-quantize leaves them.
"""
import json
import struct
import sys

import numpy as np
import gguf

NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=np.uint16 if info["dtype"] == "BF16" else np.float32)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.reshape(info["shape"])
    return out


def gguf_name(hf):
    stem, suffix = hf.rsplit(".", 1)
    if stem == "model.embed_tokens":
        return f"token_embd.{suffix}"
    if stem == "model.norm":
        return f"output_norm.{suffix}"
    if stem == "lm_head":
        return f"output.{suffix}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{NAMES[module]}.{suffix}"


def add_tokenizer(w, tok, tok_cfg, vocab_size):
    """The byte-level BPE vocabulary of tokenizer.json (`tokenizer.ggml.pre = qwen2`), its EOS
    (also BOS, not added) and chat template, padded to `vocab_size` embedding rows."""
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in tok["added_tokens"]}
    # As many tokens as embedding rows (llama.cpp refuses a shorter list): unused ids are
    # padding, as llama.cpp's own converter writes them.
    size = max(len(vocab), max(added) + 1, vocab_size)
    tokens = [None] * size
    for t, i in vocab:
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * size
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    eos = tokens.index(tok_cfg["eos_token"])
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_add_bos_token(False)
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])


def write(model_dir, out, qtype, cfg, tensors, tok, tok_cfg):
    w = gguf.GGUFWriter(out, "qwen2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    add_tokenizer(w, tok, tok_cfg, cfg["vocab_size"])
    for name, t in tensors.items():
        data = t.astype(np.float32)
        if data.ndim == 1:
            w.add_tensor(gguf_name(name), data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    model_dir, prefix = sys.argv[1], sys.argv[2]
    cfg = json.load(open(f"{model_dir}/config.json"))
    tok = json.load(open(f"{model_dir}/tokenizer.json"))
    tok_cfg = json.load(open(f"{model_dir}/tokenizer_config.json"))
    tensors = read_safetensors(f"{model_dir}/model.safetensors")
    for suffix, qtype in [("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0),
                          ("q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        write(model_dir, f"{prefix}-{suffix}.gguf", qtype, cfg, tensors, tok, tok_cfg)
        print("wrote", f"{prefix}-{suffix}.gguf")


if __name__ == "__main__":
    main()
