#!/usr/bin/env python3
"""`--deterministic` on a GPU (issue 27), through the real binary: the repository's trained
model (models/stories260k, a real model, so its greedy choices are not coin flips) in bf16.
Greedy and seeded temperature-1 requests with logprobs must give bit-identical tokens and
logprobs (the JSON numbers of the same f32 bits are the same text)
- alone, on a server without a prefix cache (the reference),
- among 7 and among 63 other requests, on another server process (a restart),
- again from the prefix cache,
- after preemption (a server whose KV pool is too small for all).
The same comparison without the flag is reported, not asserted (issue 27 found 11 of 16 greedy
generations differing there). Standard library only.

    python3 tests/gpu/check_deterministic.py --bin target/cuda/release/mlxd --out det.txt
"""

import argparse
import os
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_fixtures import Server, post  # noqa: E402

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "models", "stories260k")
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine with her dog",
    "One day, a little boy named Tim found a big red ball in his garden. He wanted to show it to his mom, so he",
    "The sun was shining and the birds were singing. Mom said it was a good day to go to the park and",
]
#: (temperature, seed) of the compared requests.
SETTINGS = [(0.0, None), (1.0, 77)]
MAX_TOKENS = 64


def complete(server, prompt, temperature, seed, max_tokens, logprobs=5):
    """One completion's token ids, logprobs, top logprobs and cached prompt tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "logprobs": logprobs, "return_token_ids": True}
    if seed is not None:
        body["seed"] = seed
    reply = post(server, "/v1/completions", body)
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    cached = (reply.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ids": choice["token_ids"], "logprobs": lp["token_logprobs"], "top": lp["top_logprobs"],
            "cached": cached}


def preemptions(server):
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mlxd_num_preemptions_total "):
                return float(line.split()[-1])
    return 0.0


def serve(binary, args, kv_memory="256MiB"):
    return Server(binary, MODEL, ["--device", "cuda", *args], kv_memory=kv_memory)


def other(i):
    """The i-th request run beside the compared ones: other lengths and settings."""
    return (f"{'The cat sat on the mat and ' * (1 + i % 5)}{i}", 0.5 + (i % 4) * 0.2, i, 20 + (i % 7) * 10)


def alone(server):
    return [complete(server, p, t, s, MAX_TOKENS) for p in PROMPTS for t, s in SETTINGS]


def among_others(server, n):
    """Every compared request at once beside n others, a third of them sent before each prompt's."""
    with ThreadPoolExecutor(max_workers=n + len(PROMPTS) * len(SETTINGS)) as pool:
        compared, noise = [], []
        for k, prompt in enumerate(PROMPTS):
            for i in range(n * k // 3, n * (k + 1) // 3):
                p, t, s, m = other(i)
                noise.append(pool.submit(complete, server, p, t, s, m, 3))
            for t, s in SETTINGS:
                compared.append(pool.submit(complete, server, prompt, t, s, MAX_TOKENS))
        for f in noise:
            f.result()
        return [f.result() for f in compared]


def differing(got, want):
    return [i for i, (g, w) in enumerate(zip(got, want))
            if (g["ids"], g["logprobs"], g["top"]) != (w["ids"], w["logprobs"], w["top"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lines, ok = [], True

    def report(case, got, want, must_match=True):
        nonlocal ok
        bad = differing(got, want)
        first = ""
        if bad:
            g, w = got[bad[0]], want[bad[0]]
            step = next((j for j, (a, b) in enumerate(zip(g["logprobs"], w["logprobs"])) if a != b), None)
            first = f" (request {bad[0]}: first logprob difference at step {step})"
        verdict = "PASS" if not bad else ("FAIL" if must_match else "INFO")
        if bad and must_match:
            ok = False
        lines.append(f"{verdict} {case}: {len(got) - len(bad)} of {len(got)} bit-identical{first}")
        print(lines[-1], flush=True)

    base = serve(args.bin, ["--deterministic", "--no-prefix-cache"])
    want = alone(base)
    base.close()
    if not all(len(w["ids"]) > 8 for w in want):
        lines.append("FAIL the reference requests generate too little")
        ok = False

    det = serve(args.bin, ["--deterministic", "--max-seqs", "64"])
    for n in (7, 63):
        report(f"deterministic, among {n} others (another process)", among_others(det, n), want)
    again = among_others(det, 0)
    hits = [g["cached"] for g in again]
    report(f"deterministic, from the prefix cache (cached prompt tokens {hits})", again, want)
    if not all(h >= 16 for h in hits):
        lines.append(f"FAIL no prefix hit: {hits}")
        ok = False
    det.close()

    # stories260k in bf16 keeps 640 bytes of KV per token: 32 blocks of 16 tokens.
    tight = serve(args.bin, ["--deterministic", "--max-seqs", "64"], kv_memory=str(32 * 16 * 640))
    got = among_others(tight, 24)
    preempted = preemptions(tight)
    report(f"deterministic, after preemption ({preempted:.0f} preemptions)", got, want)
    if preempted < 1:
        lines.append("FAIL no preemption happened")
        ok = False
    tight.close()

    fast = serve(args.bin, ["--max-seqs", "64", "--no-prefix-cache"])
    fast_alone = alone(fast)
    report("default mode (not asserted), among 63 others vs alone", among_others(fast, 63), fast_alone, False)
    fast.close()

    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
