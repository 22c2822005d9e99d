#!/usr/bin/env python3
"""A tiny random-weight gpt-oss model, as a float32 folder and as an MXFP4 folder in the format
of openai/gpt-oss-*, with transformers' references of both, for tests/gpt_oss_models.rs.
Pinned: transformers 5.25.0, torch 2.15.0 (CPU float32).

    python3 -m venv /tmp/refs && /tmp/refs/bin/pip install torch==2.15.0 transformers==5.25.0
    /tmp/refs/bin/python tests/data/gpt_oss/make_fixtures.py --out tests/data/gpt_oss \
        --tokenizers ../shared/fixtures --templates ../shared/tokenizers/chat_templates

Its GGUF copies and llama.cpp's references: tests/data/moe/make_gguf.py (see there).

The model has every part of the released ones, small: biased q/k/v/o, a learned attention sink
per head, sliding-window layers (window 8) alternating with full ones, YaRN (factor 32 over
4096 positions; `truncate: true`, the ramp's ends rounded to whole dimensions, as llama.cpp and
mlx-lm always compute it, so that every reference agrees: the released `truncate: false` is
checked against transformers' frequencies in src/models/config.rs), and in every layer 8 experts of which 2 are
routed per token (biased router, softmax over the kept logits), each expert with biases, its
gate and up projections interleaved column by column, and the clamped SwiGLU.

- f32/: model.safetensors as `save_pretrained` writes it (`experts.gate_up_proj` `[E, H, 2I]`),
  config.json as the Hub's checkpoints spell it (`rope_scaling`, `rope_theta`), and a tokenizer:
  the Qwen3 fixture's 505 byte-level BPE tokens with harmony's special tokens after them
  (`<|start|>`, `<|channel|>`, `<|message|>`, `<|end|>`, `<|return|>`, `<|call|>`, …), and the
  real gpt-oss chat template.
- mxfp4/: the same model with its experts quantized to MXFP4 as OpenAI ships them
  (`*_blocks` `[E, out, in/32, 16]` u8, low nibble first; `*_scales` `[E, out, in/32]` E8M0),
  `quantization_config` `mxfp4`; every other tensor as in f32/.
- refs/transformers-f32.*: per prompt the greedy continuation and every step's logits of f32/;
  refs/transformers-mxfp4.*: the same of mxfp4/ as transformers loads it (dequantized,
  `Mxfp4Config(dequantize=True)`) (tests/data/reference_runs.py).

The seed is the first whose greedy steps keep a top-1/top-2 margin of MIN_MARGIN in both.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_runs import MIN_MARGIN, SEED_BASE, greedy, prompts, write_references  # noqa: E402

BPE_TOKENS = 505
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
            "<|constrain|>", "<|return|>", "<|call|>"]
SPECIAL_ID = {t: BPE_TOKENS + i for i, t in enumerate(SPECIALS)}
VOCAB = 520  # the embedding's rows, padded beyond the tokens as the released models' are

CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    layer_types=["sliding_attention", "full_attention"] * 2,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": True, "original_max_position_embeddings": 4096},
    eos_token_id=SPECIAL_ID["<|return|>"],
    pad_token_id=SPECIAL_ID["<|endoftext|>"],
    tie_word_embeddings=False,
)

# OCP MX: E2M1 elements, one E8M0 (2^(e - 127)) scale per 32.
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def init_weights(model, seed):
    """Every parameter matters: norms around 1, linear weights ~ N(0, 1/fan_in) (the experts'
    larger, so the clamp of the SwiGLU engages), biases and sinks random, the router scaled so
    routing is decisive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.3 * r
            elif name.endswith("sinks"):
                v = 1.0 * r
            elif name.endswith(("_bias", ".bias")):
                v = 0.3 * r
            elif name.endswith("router.weight"):
                v = r * (3.0 / p.shape[-1] ** 0.5)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                v = r * (3.0 / p.shape[-2] ** 0.5)  # stored [E, in, out]
            elif name.endswith("embed_tokens.weight"):
                v = 0.5 * r
            elif p.ndim == 2:
                v = r * (1.0 / p.shape[-1] ** 0.5)
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")
            p.copy_(v)


def mxfp4_quantize(w):
    """`w` `[..., rows, K]` (rows = outputs) → blocks u8 `[..., rows, K/32, 16]` (element 2i in
    the low nibble of byte i) and E8M0 scales u8 `[..., rows, K/32]`: the scale puts the group's
    largest magnitude in [4, 8), each element the nearest E2M1 value."""
    *lead, rows, k = w.shape
    groups = w.astype(np.float32).reshape(*lead, rows, k // 32, 32)
    amax = np.abs(groups).max(-1)
    e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, -127).clip(-127, 127).astype(np.int32)
    q = groups / np.exp2(e)[..., None]
    code = np.abs(np.abs(q)[..., None] - FP4[:8]).argmin(-1).astype(np.uint8)
    code = np.where((q < 0) & (code != 0), code + 8, code).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (e + 127).astype(np.uint8)


def write_mxfp4(f32_dir, out):
    """The MXFP4 folder of the float32 one."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(f32_dir / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows_by_in = np.ascontiguousarray(np.swapaxes(t.numpy(), -1, -2))  # [E, out, in]
            blocks, scales = mxfp4_quantize(rows_by_in)
            tensors[name + "_blocks"] = torch.from_numpy(blocks)
            tensors[name + "_scales"] = torch.from_numpy(scales)
        else:
            tensors[name] = t
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((f32_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in f32_dir.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(f, out / f.name)


def hub_config():
    """config.json as openai/gpt-oss-* spell it: classic `rope_scaling` and `rope_theta`."""
    c = dict(CONFIG, architectures=["GptOssForCausalLM"], model_type="gpt_oss", torch_dtype="float32",
             hidden_act="silu", attention_bias=True, swiglu_limit=7.0, initial_context_length=4096)
    rope = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    return c


def write_tokenizer(folder, tokenizers, templates):
    """The Qwen3 fixture's byte-level BPE with harmony's special tokens, and gpt-oss's template."""
    tok = json.loads((tokenizers / "qwen3" / "f32" / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {t: i for t, i in tok["model"]["vocab"].items() if i < BPE_TOKENS}
    tok["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in SPECIAL_ID.items()
    ]
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n")
    template = (templates / "openai-gpt-oss-120b.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 131072,
        "chat_template": template,
    }, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": SPECIAL_ID["<|startoftext|>"],
        "eos_token_id": [SPECIAL_ID["<|return|>"], SPECIAL_ID["<|call|>"], SPECIAL_ID["<|endoftext|>"]],
        "pad_token_id": SPECIAL_ID["<|endoftext|>"],
    }, indent=2) + "\n")


def runs_of(model, seed):
    return [(n, ids, *greedy(model, ids)) for n, ids in prompts(seed, VOCAB)]


def decisive(runs):
    return min(r[4] for r in runs) >= MIN_MARGIN and min(len(set(r[2])) for r in runs) >= 4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizers", type=Path, required=True, help="the shared fixtures folder")
    p.add_argument("--templates", type=Path, required=True, help="the shared chat templates folder")
    args = p.parse_args()
    torch.set_num_threads(2)
    f32_dir, mx_dir = args.out / "f32", args.out / "mxfp4"
    for seed in range(SEED_BASE, SEED_BASE + 200):
        torch.manual_seed(seed)
        model = GptOssForCausalLM(GptOssConfig(**CONFIG)).float().eval()
        init_weights(model, seed)
        f32_runs = runs_of(model, seed)
        if not decisive(f32_runs):
            continue
        shutil.rmtree(f32_dir, ignore_errors=True)
        model.save_pretrained(f32_dir, safe_serialization=True)
        (f32_dir / "config.json").write_text(json.dumps(hub_config(), indent=2) + "\n")
        write_tokenizer(f32_dir, args.tokenizers, args.templates)
        shutil.rmtree(mx_dir, ignore_errors=True)
        write_mxfp4(f32_dir, mx_dir)
        quantized = GptOssForCausalLM.from_pretrained(
            mx_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
        mx_runs = runs_of(quantized, seed)
        if not decisive(mx_runs):
            continue
        write_references(args.out / "refs", seed, f32_runs)
        write_references(args.out / "refs", seed, mx_runs, name="transformers-mxfp4")
        print(f"seed {seed}: min margins f32 {min(r[4] for r in f32_runs):.4f}, "
              f"mxfp4 {min(r[4] for r in mx_runs):.4f}")
        return
    raise SystemExit(f"no seed with margin {MIN_MARGIN}")


if __name__ == "__main__":
    main()
