#!/usr/bin/env python3
"""Time to first token of a long shared prefix: cold, warm from memory, and warm from the
disk cache after a restart (`--kv-disk`), on one model, in one run. Standard library only.

  python3 benches/kv_disk_restart.py --bin target/release/mlxd --model MODEL_DIR [--prefix 4000]

Each request is the same prefix of random token ids plus a few tokens of its own (so only the
prefix can come from a cache), streamed with `max_tokens: 1`.
"""
import argparse
import json
import random
import socket
import subprocess
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, model, disk):
    port = free_port()
    proc = subprocess.Popen([binary, "serve", "--model", model, "--port", str(port), "--kv-memory", "2GiB",
                             "--kv-disk", disk], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def stop(proc):
    proc.terminate()
    proc.wait(timeout=120)


def ttft(url, prompt):
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    started, first, cached = time.perf_counter(), None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices"):
                first = time.perf_counter() - started
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefix", type=int, default=4000)
    ap.add_argument("--vocab", type=int, default=150000)
    a = ap.parse_args()
    rng = random.Random(0)
    prefix = [rng.randrange(1000, a.vocab - 1000) for _ in range(a.prefix)]
    prompt = lambda: prefix + [rng.randrange(1000, a.vocab - 1000) for _ in range(8)]  # noqa: E731
    with tempfile.TemporaryDirectory() as disk:
        proc, url = start(a.bin, a.model, disk)
        ttft(url, [1000 + i for i in range(32)])  # warm-up: first-use costs, unrelated prefix
        cold = ttft(url, prompt())
        memory = ttft(url, prompt())
        stop(proc)
        proc, url = start(a.bin, a.model, disk)
        ttft(url, [1000 + i for i in range(32)])
        restart = ttft(url, prompt())
        stop(proc)
    rows = [("cold", cold), ("warm from memory", memory), ("warm from disk after restart", restart)]
    print(f"prefix {a.prefix} tokens, model {a.model}")
    print(f"{'':30s} {'TTFT s':>8s} {'÷ cold':>8s} {'cached tokens':>14s}")
    for name, (t, cached) in rows:
        print(f"{name:30s} {t:8.3f} {t / cold[0]:8.3f} {cached:>14}")


if __name__ == "__main__":
    main()
