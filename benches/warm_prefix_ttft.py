#!/usr/bin/env python3
"""What stands in front of a warm prefix (issue "GPU serving at its limits", item 4): N
concurrent requests whose prompts share a long cached prefix and differ in a short tail, against
one prefill step of all their new tokens. Prints each round's first-token times, the server's
engine steps in that window phase by phase (from /metrics), and the reference: one request
whose new tokens are all N tails together (one prefill step of the same work).

    python3 benches/warm_prefix_ttft.py --url http://127.0.0.1:8080 [--shared 1000 --new 29 --streams 7]

Standard library only (it runs on the GPU machine as it is)."""

import argparse
import json
import random
import re
import statistics
import threading
import time
import urllib.request

PHASES = ("schedule", "prepare", "forward", "sample", "update")


def post(url, body):
    """Sends a streamed completion; returns (seconds to the first token, seconds in all)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    sent = time.perf_counter()
    first = None
    with urllib.request.urlopen(req) as resp:
        for line in resp:
            if first is None and line.startswith(b"data: {") and b'"text"' in line:
                first = time.perf_counter() - sent
    return first, time.perf_counter() - sent


def phases(url):
    """Seconds spent and steps taken per engine phase so far."""
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    sums = dict(re.findall(r'mlxd_step_phase_seconds_sum\{(?:model="[^"]*",)?phase="(\w+)"\} (\S+)', text))
    counts = dict(re.findall(r'mlxd_step_phase_seconds_count\{(?:model="[^"]*",)?phase="(\w+)"\} (\S+)', text))
    return {p: (float(sums.get(p, 0)), int(float(counts.get(p, 0)))) for p in PHASES}


def delta(after, before):
    return {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in PHASES}


def show(label, window):
    steps = window["forward"][1]
    parts = "  ".join(f"{p} {1000 * window[p][0]:.2f}" for p in PHASES)
    print(f"  {label}: {steps} engine steps; ms per phase: {parts}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--shared", type=int, default=1000)
    ap.add_argument("--new", type=int, default=29)
    ap.add_argument("--streams", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    ids = lambda n: [rng.randrange(3, 259) for _ in range(n)]
    shared = ids(a.shared)
    body = lambda prompt: {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    # Warm the prefix and every code path (twice: the second run is all cached but the tail).
    for _ in range(2):
        post(a.url, body(shared + ids(a.new)))
    print(f"{a.streams} concurrent requests: {a.shared} shared (cached) + {a.new} new tokens each")
    ratios = []
    for r in range(a.rounds):
        tails = [ids(a.new) for _ in range(a.streams)]
        # The reference first: one request holding all the tails' tokens, one prefill step.
        before = phases(a.url)
        ref_first, _ = post(a.url, body(shared + [t for tail in tails for t in tail]))
        ref = delta(phases(a.url), before)
        tails = [ids(a.new) for _ in range(a.streams)]
        results = [None] * a.streams
        gate = threading.Barrier(a.streams)

        def one(i):
            gate.wait()
            results[i] = post(a.url, body(shared + tails[i]))

        before = phases(a.url)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(a.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst = delta(phases(a.url), before)
        firsts = sorted(1000 * f for f, _ in results)
        ratio = max(firsts) / (1000 * ref_first)
        ratios.append(ratio)
        print(f"round {r}: first token ms p50 {statistics.median(firsts):.1f}, max {max(firsts):.1f};"
              f" reference (one request, {a.streams * a.new} new tokens) {1000 * ref_first:.1f} ms; max/ref {ratio:.2f}")
        show("burst", burst)
        show("reference", ref)
    print(f"max first token / one step of the same new tokens: median over rounds {statistics.median(ratios):.2f}"
          " (goal: at most 1.5)")


if __name__ == "__main__":
    main()
