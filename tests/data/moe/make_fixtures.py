#!/usr/bin/env python3
"""Tiny random-weight mixture-of-experts models and their transformers references, for
tests/moe_models.rs. Pinned: transformers 5.25.0, torch 2.15.0 (CPU float32).

    python3 -m venv /tmp/refs && /tmp/refs/bin/pip install torch==2.15.0 transformers==5.25.0
    /tmp/refs/bin/python tests/data/moe/make_fixtures.py --out tests/data/moe --tokenizers ../shared/fixtures

For each architecture it writes <arch>/f32/ (config.json in the Hub's classic keys and
model.safetensors as `save_pretrained` writes it: one tensor per expert, as the Hub's
checkpoints hold them; the tokenizer and generation config of the dense fixture of the same
family, whose vocabulary of 512 the models share, so the folders can be served and converted) and <arch>/refs/transformers-f32.{json,safetensors}: per prompt, the
greedy continuation and the logits of every greedy step (each prompt computed alone, no
padding; tests/data/reference_runs.py). The seed is the first whose every greedy step has a top-1/top-2 logit
margin of at least MIN_MARGIN, so the greedy ids are robust to float32 rounding.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_runs import decisive_model, write_references  # noqa: E402

VOCAB = 512

# The dense fixture whose tokenizer each architecture takes.
TOKENIZER_FROM = {"qwen3_moe": "qwen3", "mixtral": "mistral"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

ARCHS = {
    # Qwen3-30B-A3B's shape in small: q/k norms, head_dim 32 != hidden / heads, 8 experts of
    # which 2 per token, top-k weights renormalized (`norm_topk_prob`), every layer sparse (as
    # the released models and llama.cpp's `qwen3moe` have them).
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(
            COMMON,
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_theta=1e6,
        ),
    ),
    # Mixtral: every layer sparse (`block_sparse_moe`, experts w1/w2/w3), top-2 renormalized.
    "mixtral": (
        MixtralConfig,
        dict(COMMON, head_dim=16, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, rope_theta=1e6),
    ),
}


def init_weights(model, seed):
    """Every parameter matters: norms random around 1, linear weights ~ N(0, 1/fan_in), q/k
    scaled so attention is far from uniform, the router scaled so routing is decisive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                v = 2.0 + 0.3 * r
            elif name.endswith("norm.weight"):
                v = 1.0 + 0.3 * r
            elif name.endswith("embed_tokens.weight"):
                v = r
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                v = r * (3.0 / p.shape[-1] ** 0.5)
            elif p.ndim in (2, 3):
                gain = 2.0 if any(k in name for k in ("q_proj", "k_proj")) else 1.0
                v = r * (gain / p.shape[-1] ** 0.5)
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def build(arch, out, tokenizers):
    cls, kwargs = ARCHS[arch]
    source = tokenizers / TOKENIZER_FROM[arch] / "f32"
    source_config = json.loads((source / "config.json").read_text())
    kwargs = dict(kwargs, **{k: source_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})

    def make(seed):
        model = AutoModelForCausalLM.from_config(cls(**kwargs), dtype=torch.float32).eval()
        init_weights(model, seed)
        return model

    seed, model, runs = decisive_model(arch, make, VOCAB)
    folder = out / arch / "f32"
    model.save_pretrained(folder, safe_serialization=True)
    # The Hub's classic config keys, as real checkpoints ship them.
    config = {"architectures": [model.config.architectures[0]], "model_type": model.config.model_type}
    config.update(kwargs)
    config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)
    write_references(out / arch / "refs", seed, runs)
    print(f"{arch}: seed {seed}, min margin {min(r[4] for r in runs):.4f}, {sum(p.numel() for p in model.parameters())} parameters")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizers", type=Path, required=True, help="the shared fixtures folder")
    p.add_argument("archs", nargs="*", default=list(ARCHS))
    args = p.parse_args()
    torch.set_num_threads(2)
    for arch in args.archs:
        build(arch, args.out, args.tokenizers)


if __name__ == "__main__":
    main()
