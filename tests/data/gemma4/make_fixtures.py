#!/usr/bin/env python3
"""Tiny random-weight Gemma 4 models and their transformers references, for
tests/gemma4_models.rs. Pinned: transformers 5.25.0, torch 2.15.0 (CPU float32).

    python3 -m venv /tmp/refs && /tmp/refs/bin/pip install torch==2.15.0 transformers==5.25.0
    /tmp/refs/bin/python tests/data/gemma4/make_fixtures.py --out tests/data/gemma4 --tokenizers ../shared/fixtures

Their MLX 4-bit copies and mlx-lm's references: tests/data/moe/make_mlx.py (see there).

Two variants, each the shape of a released model in small:
- `dense` (Gemma 4 E2B/E4B): per-layer input embeddings (PLE), the last layers reading the KV
  of the last earlier layer of their type (`num_kv_shared_layers`), double-wide MLPs on those
  layers, global layers with their own head_dim and proportional partial RoPE, sliding
  windows, final logit soft-capping. Saved as `Gemma4ForCausalLM` (`model.*` tensors).
- `moe` (Gemma 4 26B-A4B): every layer's dense MLP beside a routed mixture of experts (router
  with scale and per-expert scale, fused `gate_up_proj` experts), global layers whose values are
  their keys (`attention_k_eq_v`) with their own KV-head count, no PLE. Saved as
  `Gemma4ForConditionalGeneration` with a tiny vision tower (`model.language_model.*`,
  `model.vision_tower.*`), as the Hub's checkpoints are.

For each it writes <variant>/f32/ (config.json as the Hub's checkpoints spell it,
model.safetensors as `save_pretrained` writes it, the tokenizer of the Gemma 3 fixture whose
vocabulary of 512 the models share) and <variant>/refs/transformers-f32.{json,safetensors}: per
prompt, the greedy continuation and the logits of every greedy step (each prompt computed alone,
no padding, no cache; tests/data/reference_runs.py). The seed is the first whose every greedy step has a
top-1/top-2 logit margin of at least MIN_MARGIN.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_runs import decisive_model, write_references  # noqa: E402

VOCAB = 512
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    sliding_window=8,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    tie_word_embeddings=True,
)

VARIANTS = {
    # Layers 0-2 keep KV; 3 and 4 (sliding) read layer 1's, 5 (full) reads layer 2's. As in the
    # released E2B/E4B the last layer keeping KV is a full one after a sliding one, which
    # llama.cpp requires.
    "dense": dict(
        COMMON,
        num_hidden_layers=6,
        num_key_value_heads=2,
        intermediate_size=96,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        final_logit_softcapping=30.0,
        attention_k_eq_v=False,
    ),
    "moe": dict(
        COMMON,
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        intermediate_size=48,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
        final_logit_softcapping=30.0,
    ),
}

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
)


def init_weights(model, seed):
    """Every parameter matters: norms and scales random around 1 (the norms of each block's
    output around 2, and the embedding small, so that the layers and not the embedding decide
    the next token; q/k norms around 0.6), linear weights ~ N(0, 1/fan_in), the router scaled so routing is
    decisive, each layer's scalar around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name:
                continue  # the tower mlxd skips keeps its own initialization
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("layer_scalar"):
                v = 1.0 + 0.2 * r
            elif name.endswith(("inv_freq", "embed_scale")):
                continue
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Scores are not scaled by head_dim^-0.5: small head norms keep attention from
                # being nearly one-hot, which would make the references fragile to rounding.
                v = 0.6 + 0.1 * r
            elif "post_" in name and name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight")):
                v = 2.0 + 0.5 * r
            elif name.endswith(("norm.weight", "norm_2.weight", "router.scale", "per_expert_scale")):
                v = 1.0 + 0.3 * r
            elif name.endswith("embed_tokens.weight"):
                v = 0.25 * r
            elif name.endswith("embed_tokens_per_layer.weight"):
                v = r
            elif name.endswith("router.proj.weight"):
                v = r * (3.0 / p.shape[-1] ** 0.5)
            elif p.ndim in (2, 3):
                v = r * (1.0 / p.shape[-1] ** 0.5)
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def make_model(variant, text):
    if variant == "moe":
        config = Gemma4Config(text_config=Gemma4TextConfig(**text), vision_config=dict(VISION), audio_config=None)
        return Gemma4ForConditionalGeneration(config).float().eval()
    return Gemma4ForCausalLM(Gemma4TextConfig(**text)).float().eval()


def hub_config(variant, text):
    """config.json as the Hub's checkpoints spell it (`global_head_dim`,
    `num_global_key_value_heads`, per-type `rope_parameters`; a multimodal one nests the
    language model under `text_config`), which mlx-lm and llama.cpp's converter read
    (transformers 5.25 itself saves `per_layer_config` instead)."""
    text = dict(text, model_type="gemma4_text", torch_dtype="float32")
    if variant != "moe":
        return dict(text, architectures=["Gemma4ForCausalLM"])
    vision = dict(VISION, model_type="gemma4_vision")
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": vision,
        "audio_config": None,
        "vocab_size": text["vocab_size"],
        "eos_token_id": text["eos_token_id"],
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def build(variant, out, tokenizers):
    source = tokenizers / "gemma3" / "f32"
    source_config = json.loads((source / "config.json").read_text())
    text = dict(VARIANTS[variant], **{k: source_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})

    def make(seed):
        model = make_model(variant, text)
        init_weights(model, seed)
        return model

    seed, model, runs = decisive_model(variant, make, VOCAB)
    folder = out / variant / "f32"
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(hub_config(variant, text), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)
    write_references(out / variant / "refs", seed, runs)
    print(f"{variant}: seed {seed}, min margin {min(r[4] for r in runs):.4f}, {sum(p.numel() for p in model.parameters())} parameters")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizers", type=Path, required=True, help="the shared fixtures folder")
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(2)
    for variant in args.variants:
        build(variant, args.out, args.tokenizers)


if __name__ == "__main__":
    main()
