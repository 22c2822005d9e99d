#!/usr/bin/env python3
"""How far a half-precision prefill's log-probabilities are from a float32 run of the same
model: every prompt token's logprob (teacher-forced, `echo` with `logprobs`) of one random
prompt, from servers started in turn on the same model. Run it against a float32 server once
(`--save f32.json`), then against each half-precision variant (`--against f32.json`): it prints
the mean and largest |difference| per position, the measure to compare two attention kernels by
(a random model's greedy ids flip on near-ties, its teacher-forced logprobs do not).

    python3 benches/prefill_vs_f32.py --url http://127.0.0.1:8080 --save f32.json
    python3 benches/prefill_vs_f32.py --url http://127.0.0.1:8080 --against f32.json

Standard library only."""
import argparse
import json
import random
import urllib.request


def prompt_logprobs(url, n, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 30000) for _ in range(n)]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        lps = json.load(r)["choices"][0]["logprobs"]["token_logprobs"]
    return [x for x in lps[1:n] if x is not None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--lengths", default="40,300,1200")
    ap.add_argument("--save")
    ap.add_argument("--against")
    a = ap.parse_args()
    runs = {n: prompt_logprobs(a.url, int(n), 7) for n in a.lengths.split(",")}
    if a.save:
        json.dump(runs, open(a.save, "w"))
    if a.against:
        ref = json.load(open(a.against))
        for n, got in runs.items():
            d = [abs(x - y) for x, y in zip(got, ref[n])]
            print(f"n={n}: mean |diff| {sum(d) / len(d):.4f}, max {max(d):.4f} over {len(d)} positions")


if __name__ == "__main__":
    main()
