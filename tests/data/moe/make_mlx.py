#!/usr/bin/env python3
"""MLX 4-bit copies of the MoE and Gemma 4 fixtures and mlx-lm's references for them, for
tests/moe_models.rs and tests/gemma4_models.rs. Pinned: mlx 0.32.4 (CPU), mlx-lm 0.32.2.

    /tmp/refs/bin/pip install "mlx[cpu]==0.32.4" mlx-lm==0.32.2
    /tmp/refs/bin/python tests/data/moe/make_mlx.py --out tests/data/moe
    /tmp/refs/bin/python tests/data/moe/make_mlx.py --out tests/data/gemma4 dense moe
    /tmp/refs/bin/python tests/data/moe/make_mlx.py --out tests/data/moe --mode mxfp4 qwen3_moe

Per architecture (or Gemma 4 variant): <arch>/mlx-q4/ as `mlx_lm.convert -q --q-bits 4 --q-group-size 64` writes it
from f32/ (experts stacked as `switch_mlp`, the router at 8 bits), and in <arch>/refs/
mlx-q4-exact.{json,safetensors}: the same 4-bit weights dequantized exactly (`mlx_lm.convert -d`)
and computed in float32 by mlx-lm: greedy ids and every step's logits. mlx-lm's own quantized
compute of these experts runs only in float32 on a CPU (its gather_mm takes no bfloat16 there),
where it equals the exact logits; the script checks that and keeps only the exact set.
gpt-oss (`--out tests/data gpt_oss`): mlx-lm 0.32.2 reads transformers' stacked experts only
in OpenAI's MXFP4 layout (rows = outputs), so the f32 folder is first rewritten in the layout
its `sanitize` produces (`experts.<gate|up|down>_proj.weight` `[experts, out, in]`, gate and up
split from their alternate columns, biases beside) and converted from there.
`--mode mxfp4` makes <arch>/mlx-mxfp4/ instead (`--q-mode mxfp4`: every layer's codes E2M1 with
an E8M0 scale per 32, the router affine 8-bit) and refs/mlx-mxfp4-exact.*.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from safetensors.numpy import save_file

ARCHS = ["qwen3_moe", "mixtral"]


def convert(args):
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", *args], check=True, capture_output=True)


def logits_along(model, prompt, forced):
    """Every step's last-position logits (float32) of `prompt` followed by `forced`, one full
    forward per step (no cache)."""
    rows = []
    seq = list(prompt)
    for tok in forced:
        out = model(mx.array([seq]))[0, -1].astype(mx.float32)
        rows.append(np.array(out))
        seq.append(tok)
    return np.stack(rows)


def greedy(model, prompt, steps):
    seq, ids, rows = list(prompt), [], []
    for _ in range(steps):
        out = np.array(model(mx.array([seq]))[0, -1].astype(mx.float32))
        nxt = int(out.argmax())
        rows.append(out)
        ids.append(nxt)
        seq.append(nxt)
    return ids, np.stack(rows)


MODES = {
    "affine": ("mlx-q4", ["--q-bits", "4", "--q-group-size", "64"]),
    "mxfp4": ("mlx-mxfp4", ["--q-mode", "mxfp4", "--q-bits", "4", "--q-group-size", "32"]),
}


def sanitized_gpt_oss(src, dst):
    """A copy of the gpt-oss folder `src` with its experts as mlx-lm's `sanitize` leaves them."""
    from safetensors.numpy import load_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in weights.items():
        if k.endswith("experts.gate_up_proj"):  # [experts, hidden, 2·inner], gate/up alternating
            base = k[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = np.ascontiguousarray(v[..., ::2].transpose(0, 2, 1))
            out[base + "up_proj.weight"] = np.ascontiguousarray(v[..., 1::2].transpose(0, 2, 1))
        elif k.endswith("experts.gate_up_proj_bias"):
            base = k[: -len("gate_up_proj_bias")]
            out[base + "gate_proj.bias"] = np.ascontiguousarray(v[..., ::2])
            out[base + "up_proj.bias"] = np.ascontiguousarray(v[..., 1::2])
        elif k.endswith("experts.down_proj"):  # [experts, inner, hidden]
            out[k + ".weight"] = np.ascontiguousarray(v.transpose(0, 2, 1))
        elif k.endswith("experts.down_proj_bias"):
            out[k[: -len("_bias")] + ".bias"] = v
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})


def build(arch, out, mode):
    name, q_args = MODES[mode]
    src, q4, refs = out / arch / "f32", out / arch / name, out / arch / "refs"
    scratch = out / arch / f"{name}-exact.tmp"
    for d in (q4, scratch):
        shutil.rmtree(d, ignore_errors=True)
    if arch == "gpt_oss":
        sanitized_gpt_oss(src, out / arch / "f32-mlx-layout.tmp")
        src = out / arch / "f32-mlx-layout.tmp"
    convert(["--hf-path", str(src), "--mlx-path", str(q4), "-q", *q_args, "--dtype", "float32"])
    (q4 / "README.md").unlink(missing_ok=True)
    convert(["--hf-path", str(q4), "--mlx-path", str(scratch), "-d", "--dtype", "float32"])
    tf = json.loads((refs / "transformers-f32.json").read_text())
    steps = tf["greedy_steps"]
    exact_model, _ = load(str(scratch))
    native_model, _ = load(str(q4))
    seqs, exact_t, native_t = [], {}, {}
    for s in tf["sequences"]:
        ids, rows = greedy(exact_model, s["prompt_ids"], steps)
        seqs.append({"name": s["name"], "prompt_ids": s["prompt_ids"], "greedy_ids": ids})
        exact_t[f"{s['name']}.step_logits"] = rows
        native_t[f"{s['name']}.step_logits"] = logits_along(native_model, s["prompt_ids"], ids)
    import mlx_lm
    meta = {"versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}, "greedy_steps": steps,
            "sequences": seqs}
    (refs / f"{name}-exact.json").write_text(json.dumps(meta) + "\n")
    save_file(exact_t, str(refs / f"{name}-exact.safetensors"))
    shutil.rmtree(scratch)
    shutil.rmtree(out / arch / "f32-mlx-layout.tmp", ignore_errors=True)
    worst = max(float(np.abs(native_t[k] - exact_t[k]).max()) for k in exact_t)
    assert worst < 1e-3, f"{arch}: mlx-lm's quantized compute is {worst} from its exact dequantization"
    print(f"{arch}: mlx-lm quantized vs exact, largest logit difference {worst:.5f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=sorted(MODES), default="affine")
    p.add_argument("archs", nargs="*", default=ARCHS)
    a = p.parse_args()
    for arch in a.archs:
        build(arch, a.out, a.mode)


if __name__ == "__main__":
    main()
