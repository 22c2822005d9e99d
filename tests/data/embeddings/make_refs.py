#!/usr/bin/env python3
"""Reference sentence embeddings of the tiny fixture models, from transformers (an
implementation independent of mlxd): the final hidden states (after the model's last norm) of
each fixture prompt, pooled by mean and by last token, L2-normalised.

    python make_refs.py --fixtures ../shared/fixtures --out tests/data/embeddings

Needs torch and transformers (the versions the fixtures were made with, or close). Writes one
<arch>.json per architecture: {"versions", "prompts": {name: {"ids", "mean", "last"}}}.
"""
import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModel

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "phi3-longrope"]


def pooled(model, ids):
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
    out = {}
    for name, v in (("mean", h.mean(0)), ("last", h[-1])):
        out[name] = [round(float(x), 8) for x in v / v.norm()]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fixtures", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(4)
    for arch in ARCHS:
        folder = args.fixtures / arch / "f32"
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        prompts = json.loads((args.fixtures / arch / "refs" / "prompts.json").read_text())
        refs = {}
        for seq in prompts["sequences"] + prompts["batch"]:
            refs[seq["name"]] = {"ids": seq["ids"], **pooled(model, seq["ids"])}
        doc = {
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model": f"fixtures/{arch}/f32",
            "hidden_size": model.config.hidden_size,
            "prompts": refs,
        }
        (args.out / f"{arch}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(arch, "ok", len(refs), "prompts")


if __name__ == "__main__":
    main()
