"""What the fixture scripts of tests/data share: the prompts every reference covers, the greedy
run of transformers that is the reference (a full forward per step, no cache, no padding), the
search for a seed whose every greedy step is decisive, and the reference files.

A reference set is <refs>/transformers-f32.json (versions, seed, greedy_steps, min_margin and
per sequence its name, prompt and greedy ids) and transformers-f32.safetensors (per sequence
`<name>.step_logits`, `[greedy_steps, vocab]` float32).
"""
import json

import torch
import transformers
from safetensors.torch import save_file

SEED_BASE = 1000
MIN_MARGIN = 2e-3
GREEDY_STEPS = 16


def prompts(seed, vocab):
    """Five prompts of random ids (1, 7, 33, 12 and 5 tokens), never the first three ids."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    return [("p1", ids(1)), ("p7", ids(7)), ("p33", ids(33)), ("b0", ids(12)), ("b1", ids(5))]


def greedy(model, ids):
    """Greedy steps from `ids`, each a full forward of the sequence so far (no cache): the ids,
    every step's logits and the smallest top-1/top-2 margin."""
    seq, out, logits, margin = list(ids), [], [], float("inf")
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            last = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            top = torch.topk(last, 2).values
            margin = min(margin, float(top[0] - top[1]))
            nxt = int(torch.argmax(last))
            logits.append(last)
            out.append(nxt)
            seq.append(nxt)
    return out, torch.stack(logits), margin


def decisive_model(name, make, vocab):
    """The model `make(seed)` of the first seed from SEED_BASE whose greedy runs of every prompt
    keep a top-2 margin of MIN_MARGIN (so the ids are robust to float32 rounding) and hold at
    least 4 distinct ids each: (seed, model, runs), a run being (name, prompt, ids, logits,
    margin)."""
    for seed in range(SEED_BASE, SEED_BASE + 200):
        torch.manual_seed(seed)
        model = make(seed)
        runs = [(n, ids, *greedy(model, ids)) for n, ids in prompts(seed, vocab)]
        if min(r[4] for r in runs) >= MIN_MARGIN and min(len(set(r[2])) for r in runs) >= 4:
            return seed, model, runs
    raise SystemExit(f"{name}: no seed with margin {MIN_MARGIN}")


def write_references(refs, seed, runs, name="transformers-f32"):
    """The reference set of `runs` in the folder `refs`, as `<name>.json` and
    `<name>.safetensors`."""
    refs.mkdir(parents=True, exist_ok=True)
    meta = {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "seed": seed,
        "greedy_steps": GREEDY_STEPS,
        "min_margin": min(r[4] for r in runs),
        "sequences": [{"name": n, "prompt_ids": ids, "greedy_ids": toks} for n, ids, toks, _, _ in runs],
    }
    (refs / f"{name}.json").write_text(json.dumps(meta) + "\n")
    save_file({f"{n}.step_logits": lg.contiguous() for n, _, _, lg, _ in runs}, refs / f"{name}.safetensors")
