#!/usr/bin/env python3
"""Write an MLX affine-quantized copy (the layout of `mlx_lm.convert -q`) of a Hugging Face
folder, for speed benchmarks of mlxd's MLX path (MLX itself does not run on Linux).

Usage (bench venv with `pip install numpy`):
  python benches/make_mlx.py MODEL_DIR OUT_DIR [BITS] [GROUP]      (default 4 bits, group 64)

Every 2-D weight whose input width the group divides (projections and the embedding) becomes
`weight` (u32, little-endian bit stream of the levels), `scales` and `biases` (bf16), with
`w ≈ scale · q + bias`; scale = (max - min) / (2^bits - 1) and bias = min per group (mlx's
rounding details differ; the layout, and so the speed, is the same). Other tensors are copied.
config.json gets the `quantization` entry mlx-lm writes.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_gguf import read_safetensors  # noqa: E402


def bf16(x):
    """float32 array -> bf16 bits (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def quantize(w, bits, group):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    levels = (1 << bits) - 1
    scale = np.maximum((hi - lo) / levels, 1e-12)
    q = np.clip(np.rint((g - lo[..., None]) / scale[..., None]), 0, levels).astype(np.uint64)
    q = q.reshape(rows, cols)
    # Little-endian bit stream per row: element i at bits [i*bits, (i+1)*bits).
    words = np.zeros((rows, cols * bits // 32), dtype=np.uint64)
    for i in range(cols):
        bit = i * bits
        words[:, bit // 32] |= (q[:, i] << np.uint64(bit % 32)) & np.uint64(0xFFFFFFFF)
        if bit % 32 + bits > 32:
            words[:, bit // 32 + 1] |= q[:, i] >> np.uint64(32 - bit % 32)
    return words.astype(np.uint32), bf16(scale), bf16(lo)


def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "mlx"}}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def main():
    src, out = sys.argv[1], sys.argv[2]
    bits = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    group = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    os.makedirs(out, exist_ok=True)
    tensors = read_safetensors(os.path.join(src, "model.safetensors"))
    result = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and w.ndim == 2 and w.shape[1] % group == 0:
            stem = name[: -len(".weight")]
            packed, scales, biases = quantize(w, bits, group)
            result[f"{stem}.weight"] = ("U32", packed)
            result[f"{stem}.scales"] = ("BF16", scales)
            result[f"{stem}.biases"] = ("BF16", biases)
        else:
            result[name] = ("BF16", bf16(w))
    write_safetensors(os.path.join(out, "model.safetensors"), result)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization"] = cfg["quantization_config"] = {"group_size": group, "bits": bits, "mode": "affine"}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in os.listdir(src):
        if f not in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))


if __name__ == "__main__":
    main()
