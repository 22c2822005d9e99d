#!/usr/bin/env python3
"""GPU numerics through the real binary: every fixture family and weight format is served on
the device and its greedy tokens and top-20 logprobs are compared with the references of
../shared/fixtures (transformers, mlx-lm, llama.cpp). Standard library only (the GPU machine
has no network): it runs wherever a `cuda` build of mlxd and a GPU are.

Comparisons, per sequence (p1, p7, p33, b0, b1; all five requests sent at once, so they are
batched):
- greedy tokens equal the reference's, up to a step where the reference's own top-1/top-2
  margin is below the tolerance (a near-tie that rounding may flip);
- at the first step, the top-20 logprobs relative to the top token (which cancels the
  log-sum-exp, so the reference's logits compare directly) within the tolerance.

Tolerances: f32 compute is held to the CPU's (2e-4). bf16 compute to twice the difference
that transformers' own bf16 run shows against its f32 run on the same prompts (from the
reference data), per family. GGUF files against llama.cpp, whose own top-2 margins judge a
divergence:
- F32: llama.cpp's float32-attention run, exactly (tolerance 1e-9);
- Q8_0 / Q4_0 with MLXD_CUDA_FORCE_DMMV=1 (weights dequantized exactly, f32 compute):
  llama.cpp's `dequantized_f32` run, the same arithmetic, exactly;
- Q8_0 / Q4_0 by default (candle quantizes activations to q8_1 and takes Q4_0's offset term
  from the unquantized block sums; llama.cpp's CPU quantizes to q8_0 throughout, its
  dequantized run not at all): each sequence must follow one of llama.cpp's two runs of the
  file, forgiving a divergence where that run's margin is below the largest margin at which the
  two runs disagree over all files of the type (the size of activation-quantization noise on
  these models, from the reference data).
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "phi3-longrope"]
#: tests/data files whose quantized matrices have rows of an odd number of 32-value blocks
#: (Qwen3-MoE's and gpt-oss's 32-wide expert down projections, Gemma 4 dense's 96-wide MLP down
#: projections).
ODD_BLOCK_ROWS = {("qwen3_moe", "q8_0"), ("qwen3_moe", "q4_0"), ("dense", "q8_0"), ("dense", "q4_0"),
                  ("gpt_oss", "q8_0"), ("gpt_oss", "q4_0")}
ODD_BLOCK_ROWS_WHY = ("measured on an H100, candle's exact dequantizing kernels part from llama.cpp's run of the "
                      "dequantized weights on these files within 0-5 steps (at margins up to 0.98) while mlxd's CPU "
                      "computes that run exactly, and the files with even block counts do not part: a suspected "
                      "edge of candle's kernels at these fixture-only widths, left to issue 23; the default pass "
                      "checks these files")
F32_TOL = 2e-4
#: bf16 runs of tests/data fixtures (which have only f32 references): relative logit bound and
#: the near-tie margin below which greedy ids may part from transformers' f32 run
BF16_DATA_TOL = 0.3
#: The f32 tolerance of conversations whose images are resized (tests/vision_models.rs).
RESIZED_TOL = 1.5e-3
#: GGUF kinds whose dense matrices are of another kind (the experts are MXFP4 and are
#: dequantized exactly on a GPU).
QUANTIZED_AS = {"mxfp4_moe": "q8_0"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, args, kv_memory="256MiB"):
        self.binary, self.model = binary, model
        self.port = free_port()
        self.log = open(f"/tmp/mlxd-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--port", str(self.port), "--kv-memory", kv_memory, *args],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlxd exited: {open(self.log.name).read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("not healthy within 120 s")
            time.sleep(0.1)

    def complete(self, prompt_ids, steps=32):
        body = {"prompt": prompt_ids, "max_tokens": steps, "temperature": 0, "ignore_eos": True,
                "logprobs": 20, "return_token_ids": True, "return_tokens_as_token_ids": True}
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.load(r)["choices"][0]
        tops = [{int(k.split(":")[1]): v for k, v in step.items()} for step in choice["logprobs"]["top_logprobs"]]
        return choice["token_ids"], tops

    def sample(self, prompt_ids, steps=32):
        body = {"prompt": prompt_ids, "max_tokens": steps, "temperature": 1.0, "seed": 5, "ignore_eos": True,
                "return_token_ids": True}
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["choices"][0]["token_ids"]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def relative_diff(ours, ref_ids, ref_values):
    """Largest difference of (logit - top logit) over the reference's top 20 that we report."""
    top = ref_ids[0]
    if top not in ours:
        return float("inf")
    worst = 0.0
    for i, v in zip(ref_ids, ref_values):
        if i in ours:
            worst = max(worst, abs((ours[i] - ours[top]) - (v - ref_values[0])))
    return worst


def first_divergence(got, want, margins, tol):
    """None if equal up to ties; else the step where they differ although the margin is wide."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            margin = margins[step] if step < len(margins) else None
            return None if margin is None or margin < tol else step
    return None


def check(name, server, sequences, tol, margins_key="greedy_top2_margins", alternatives=None):
    """Sends every sequence at once; returns (ok, report line). With `alternatives` (another
    reference run of the same sequences) a sequence may follow either run."""
    prompts = [s["prompt_ids"] for s in sequences]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(server.complete, prompts))
    worst, bad = 0.0, []
    for n, (s, (ids, tops)) in enumerate(zip(sequences, results)):
        top20 = s.get("last_logits_top20")
        if top20:
            worst = max(worst, relative_diff(tops[0], top20["ids"], top20["values"]))
        runs = [s] + ([alternatives[n]] if alternatives else [])
        steps = []
        for run_ in runs:
            margins = run_.get(margins_key) or run_.get("llamacpp_top2_logit_margins") or []
            steps.append(first_divergence(ids, run_["greedy_ids"], margins, tol))
        if all(step is not None for step in steps):
            bad.append(f"{s.get('name', '?')} diverges at step {'/'.join(map(str, steps))}")
    ok = worst <= tol and not bad
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: max relative logit diff {worst:.2e} (tol {tol:.1e}) {' '.join(bad)}"


def batch_invariance(name, server, sequences):
    """The same request alone and among 7 others: identical tokens and logprobs (greedy), and
    identical tokens for a seeded sampled request (temperature 1, seed 5). Both from the
    prefix cache (a first run warms it): a cold prefill computes the prompt's positions with
    the tensor-core kernel, a cached prefix its last one with the decode kernel, which rounds
    differently in half precision (issue 27's deterministic mode owns that difference)."""
    target = sequences[2]["prompt_ids"]
    others = [s["prompt_ids"] for s in sequences] + [s["prompt_ids"][:3] for s in sequences]
    others = others[:7]
    server.complete(target)
    alone = server.complete(target)
    seeded_alone = server.sample(target)
    with ThreadPoolExecutor(16) as pool:
        noise = [pool.submit(server.complete, o) for o in others]
        noise += [pool.submit(server.sample, o) for o in others]
        together = pool.submit(server.complete, target)
        seeded_together = pool.submit(server.sample, target)
        [f.result() for f in noise]
        together, seeded_together = together.result(), seeded_together.result()
    same_ids = alone[0] == together[0]
    worst = max(abs(a[i] - b[i]) for a, b in zip(alone[1], together[1]) for i in a if i in b)
    ok = same_ids and seeded_alone == seeded_together
    detail = f"greedy ids equal: {same_ids}, max logprob diff {worst:.2e}, seeded ids equal: {seeded_alone == seeded_together}"
    return ok, f"{'PASS' if ok else 'FAIL'} {name} alone == batched: {detail}"


def device_sampler(name, server, sequences):
    """The device sampler (CUDA: every row is sampled on the GPU) against what the served
    logprobs say the distribution is. One prompt, first generated token unless noted."""
    prompt = sequences[0]["prompt_ids"]
    greedy, tops = server.complete(prompt, steps=8)
    first = tops[0]  # id -> logprob of the raw distribution at step 0

    def ids(steps=1, **kw):
        body = {"prompt": prompt, "max_tokens": steps, "ignore_eos": True, "return_token_ids": True, **kw}
        req = urllib.request.Request(server.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["choices"][0]["token_ids"]

    ranked = sorted(first, key=lambda i: (-first[i], i))
    bad = []

    def expect(what, ok):
        if not ok:
            bad.append(what)

    expect("top_k=1 at temperature 1 is greedy", ids(8, temperature=1.0, top_k=1, seed=1) == greedy)
    expect("tiny top_p is greedy", ids(8, temperature=1.0, top_p=1e-6, seed=2) == greedy)
    expect("min_p=1 is greedy", ids(8, temperature=1.0, min_p=1.0, seed=3) == greedy)
    forced = ranked[7]
    expect("logit_bias +100 forces a token", ids(4, temperature=0.8, logit_bias={str(forced): 100}, seed=4) == [forced] * 4)
    banned = ids(1, temperature=0, logit_bias={str(greedy[0]): -100})
    expect("logit_bias -100 bans the greedy token", banned == [ranked[1]])
    same = ids(16, temperature=1.0, seed=11) == ids(16, temperature=1.0, seed=11)
    expect("the same seed gives the same tokens", same)
    # top_k=3 at temperature 1: 600 draws (seeds 0..599) stay in the top 3 and follow their
    # renormalized probabilities (each within 5 standard deviations).
    k, draws = 3, 600
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda seed: ids(1, temperature=1.0, top_k=k, seed=seed)[0], range(draws)))
    weights = [math.exp(first[i]) for i in ranked[:k]]
    probs = [w / sum(weights) for w in weights]
    expect("top_k=3 draws stay in the top 3", set(got) <= set(ranked[:k]))
    for i, p in zip(ranked[:k], probs):
        freq = got.count(i) / draws
        if abs(freq - p) > 5 * math.sqrt(p * (1 - p) / draws) + 1e-3:
            bad.append(f"token {i}: drawn {freq:.3f}, expected {p:.3f}")
    # top_p=0.5: draws stay in the nucleus, when it ends inside the reported top 20 (then it
    # is known exactly).
    cumulative, nucleus = 0.0, []
    for i in ranked:
        nucleus.append(i)
        cumulative += math.exp(first[i])
        if cumulative >= 0.5:
            break
    nucleus_checked = cumulative >= 0.5
    if nucleus_checked:
        with ThreadPoolExecutor(32) as pool:
            nucleus_draws = list(pool.map(lambda seed: ids(1, temperature=1.0, top_p=0.5, seed=seed)[0], range(100)))
        expect("top_p=0.5 draws stay in the nucleus", set(nucleus_draws) <= set(nucleus))
    # Penalties and bias at temperature 0 on the device equal the host sampler's on the CPU.
    penalized = dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6,
                     logit_bias={str(ranked[2]): 0.5})
    on_device = ids(16, **penalized)
    cpu = Server(server.binary, server.model, ["--device", "cpu", "--dtype", "f32"])
    try:
        server.base, device_base = cpu.base, server.base
        on_cpu = ids(16, **penalized)
        server.base = device_base
    finally:
        cpu.close()
    expect(f"penalized greedy tokens equal the CPU's ({on_device} vs {on_cpu})", on_device == on_cpu)
    ok = not bad
    detail = (f"top-3 probabilities {[round(p, 3) for p in probs]}, drawn {[got.count(i) / draws for i in ranked[:k]]}, "
              f"nucleus of {len(nucleus)} checked: {nucleus_checked}")
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: {detail} {'; '.join(bad)}"


def structured_output(name, server, sequences):
    """Structured output with every row sampled on the GPU (the grammar's token mask applied by
    the device sampler): a bounded schema at several temperatures parses, follows the schema and
    ends as `stop`; streamed and unstreamed outputs agree."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "pet": {"enum": ["cat", "dog", "bird"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": False,
    }
    bad = []
    for n, (temperature, seed) in enumerate([(0.0, 0), (0.7, 1), (1.0, 2), (1.3, 3)]):
        body = {"prompt": sequences[n % len(sequences)]["prompt_ids"], "max_tokens": 300, "temperature": temperature,
                "seed": seed, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
        req = urllib.request.Request(server.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.load(r)["choices"][0]
        try:
            v = json.loads(choice["text"])
            ok = (choice["finish_reason"] == "stop" and set(v) == set(schema["properties"])
                  and len(v["name"]) <= 12 and isinstance(v["age"], int) and 0 <= v["age"] <= 99
                  and v["pet"] in ("cat", "dog", "bird") and len(v["tags"]) <= 3
                  and all(isinstance(t, str) and len(t) <= 5 for t in v["tags"]))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            bad.append(f"t={temperature}: {choice['finish_reason']} {choice['text'][:120]!r}")
    ok = not bad
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: 4 temperatures {'; '.join(bad)}"


def post(server, path, body):
    req = urllib.request.Request(server.base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def embeddings(name, server, refs):
    """Every reference prompt embedded in one batched request and alone: mean-pooled final
    hidden states within 1e-4 of transformers' (tests/data/embeddings)."""
    names = list(refs)
    batch = post(server, "/v1/embeddings", {"input": [refs[n]["ids"] for n in names]})["data"]
    worst = 0.0
    for n, d in zip(names, batch):
        single = post(server, "/v1/embeddings", {"input": refs[n]["ids"]})["data"][0]["embedding"]
        for got in (d["embedding"], single):
            worst = max(worst, max(abs(a - b) for a, b in zip(got, refs[n]["mean"])))
    ok = worst <= 1e-4
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: max |diff| {worst:.2e} over {len(names)} prompts, batched and alone"


def forced_tool_calls(name, server, sequences):
    """`tool_choice: required` on the GPU (the call's grammar masked by the device sampler):
    a call of a given tool whose arguments follow its schema, at several temperatures."""
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}}]
    bad = []
    for temperature, seed in [(0.0, 0), (0.8, 1), (1.2, 2)]:
        body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "tool_choice": "required",
                "temperature": temperature, "seed": seed, "max_tokens": 120}
        choice = post(server, "/v1/chat/completions", body)["choices"][0]
        try:
            call = choice["message"]["tool_calls"][0]["function"]
            args = json.loads(call["arguments"])
            ok = (choice["finish_reason"] == "tool_calls" and call["name"] == "forecast" and set(args) == {"city", "days"}
                  and len(args["city"]) <= 10 and 1 <= args["days"] <= 7)
        except (KeyError, IndexError, TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f"t={temperature}: {json.dumps(choice)[:200]}")
    ok = not bad
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: 3 temperatures {'; '.join(bad)}"


def kv_disk_restart(name, binary, model, args, sequences):
    """The disk tier on the GPU: a long prompt's blocks written by one server are read back by
    the next (a restart) into device memory, and the greedy output is the same."""
    import tempfile
    prompt = [t for s in sequences for t in s["prompt_ids"]][:70]
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with tempfile.TemporaryDirectory() as disk:
        outs = []
        for _ in range(2):
            server = Server(binary, model, args + ["--kv-disk", disk])
            try:
                r = post(server, "/v1/completions", body)
                outs.append((r["choices"][0]["token_ids"], r["usage"]["prompt_tokens_details"]["cached_tokens"]))
            finally:
                server.close()
    (cold, cold_cached), (warm, warm_cached) = outs
    full = (len(prompt) - 1) // 16 * 16
    ok = cold == warm and cold_cached == 0 and warm_cached == full
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: cached {cold_cached} → {warm_cached} of {full}, same tokens: {cold == warm}"


def load(path):
    with open(path) as f:
        return json.load(f)


def step_logits(path):
    """The float32 tensors of a safetensors file (its format read directly: no safetensors
    package on the GPU machine), by name, as lists of rows."""
    import numpy as np
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(t["shape"])
    return out


def data_refs(refs_dir, name):
    """A reference set of tests/data (`<name>.json` and its step logits): the sequences with the
    top-2 margin of every greedy step and the top 20 logits of the first, as the shared
    fixtures' references carry them."""
    meta = load(f"{refs_dir}/{name}.json")
    logits = step_logits(f"{refs_dir}/{name}.safetensors")
    seqs = []
    for s in meta["sequences"]:
        rows = logits[f"{s['name']}.step_logits"]
        order = rows.argsort(axis=1)[:, ::-1]
        margins = [float(r[o[0]] - r[o[1]]) for r, o in zip(rows, order)]
        top = order[0][:20]
        seqs.append(dict(s, greedy_top2_margins=margins,
                         last_logits_top20={"ids": [int(i) for i in top], "values": [float(rows[0][i]) for i in top]}))
    return seqs


def vision(name, server, sequences, tol, images_dir):
    """Gemma 3 with images (tests/data/gemma3_vision): every reference conversation at once
    through chat completions, each image a data: URL; greedy ids against transformers' and the
    first step's top-20 logprobs relative to the top token (bf16 checks only the ids up to a
    near-tie)."""
    import base64

    def chat(s):
        messages = []
        for m in s["messages"]:
            parts = []
            for c in m["content"]:
                if c["type"] == "text":
                    parts.append(c)
                else:
                    with open(f"{images_dir}/{c['image']}.png", "rb") as f:
                        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            messages.append({"role": m["role"], "content": parts})
        body = {"messages": messages, "max_tokens": len(s["greedy_ids"]), "temperature": 0, "ignore_eos": True,
                "logprobs": True, "top_logprobs": 20, "return_tokens_as_token_ids": True}
        req = urllib.request.Request(server.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            content = json.load(r)["choices"][0]["logprobs"]["content"]
        ids = [int(t["token"].split(":")[1]) for t in content]
        tops = [{int(a["token"].split(":")[1]): a["logprob"] for a in t["top_logprobs"]} for t in content]
        return ids, tops

    with ThreadPoolExecutor(len(sequences)) as pool:
        results = list(pool.map(chat, sequences))
    worst, bad = 0.0, []
    for s, (ids, tops) in zip(sequences, results):
        top20 = s["last_logits_top20"]
        diff = relative_diff(tops[0], top20["ids"], top20["values"])
        # Images resized here differ from PIL's by a pixel level, which moves f32 logits by up
        # to 8.2e-4 on the CPU too (tests/vision_models.rs): those are judged to RESIZED_TOL.
        limit = max(tol, RESIZED_TOL) if s["name"] != "one_image" else tol
        worst = max(worst, diff)
        if diff > limit:
            bad.append(f"{s['name']} differs by {diff:.2e} (tol {limit:.1e})")
        step = first_divergence(ids, s["greedy_ids"], s["greedy_top2_margins"], tol)
        if step is not None:
            bad.append(f"{s['name']} diverges at step {step}")
    ok = not bad
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: max relative logit diff {worst:.2e} (tol {tol:.1e}) {' '.join(bad)}"


def quant_tolerance(fx, kind):
    """The largest top-2 margin (of either run) at the first step where llama.cpp's main run
    and its dequantized-f32 run of a `kind` file part ways, over every family."""
    worst = 0.0
    for arch in ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"]:
        refs = load(f"{fx}/gguf/refs/{arch}-{kind}.json")
        for main, deq in zip(refs["sequences"], refs["other_runs"]["dequantized_f32"]["sequences"]):
            for step, (a, b) in enumerate(zip(main["greedy_ids"], deq["greedy_ids"])):
                if a != b:
                    margins = [m[step] for m in (main["llamacpp_top2_logit_margins"],
                                                 deq["llamacpp_top2_logit_margins"]) if step < len(m) and m[step] is not None]
                    worst = max([worst] + margins)
                    break
    return worst


def bf16_tolerance(refs):
    """Twice the largest relative top-20 difference of transformers' bf16 run vs its f32 run."""
    f32, bf16 = load(f"{refs}/transformers-f32.json"), load(f"{refs}/transformers-bf16.json")
    worst = 0.0
    for a, b in zip(f32["sequences"], bf16["sequences"]):
        b_top = dict(zip(b["last_logits_top20"]["ids"], b["last_logits_top20"]["values"]))
        worst = max(worst, relative_diff(b_top, a["last_logits_top20"]["ids"], a["last_logits_top20"]["values"]))
    return 2 * worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--fixtures", required=True, help="shared/fixtures (or a copy of its needed parts)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="run only the checks whose name contains this")
    a = ap.parse_args()
    fx, dev = a.fixtures, ["--device", a.device]
    lines, failed = [], 0

    def run(name, model, args, sequences, tol, check=check, **kw):
        nonlocal failed
        if a.only not in name:
            return
        if not os.path.exists(model):
            lines.append(f"SKIP {name}: {model} not here")
            return
        server = Server(a.bin, model, dev + args)
        try:
            ok, line = check(name, server, sequences, tol, **kw)
        except Exception as e:  # a failed load or request is a failed check, with its reason
            ok, line = False, f"FAIL {name}: {e}"
        finally:
            server.close()
        failed += not ok
        lines.append(line)
        print(line, flush=True)

    for arch in ARCHS:
        refs = f"{fx}/{arch}/refs"
        f32 = load(f"{refs}/transformers-f32.json")
        seqs = f32["sequences"] + f32["batch"]["members"]
        run(f"{arch} safetensors f32", f"{fx}/{arch}/f32", ["--dtype", "f32"], seqs, F32_TOL)
        if os.path.exists(f"{refs}/transformers-bf16.json"):
            run(f"{arch} safetensors bf16", f"{fx}/{arch}/f32", ["--dtype", "bf16"], seqs, bf16_tolerance(refs))
        if os.path.exists(f"{refs}/mlx-q4-f32.json"):
            mlx = load(f"{refs}/mlx-q4-f32.json")
            run(f"{arch} mlx-q4 (dequantized) f32", f"{fx}/{arch}/mlx-q4", ["--dtype", "f32"],
                mlx["sequences"] + mlx["batch"]["members"], F32_TOL)
    f32 = load(f"{fx}/qwen2/refs/transformers-f32.json")
    # In bf16 a request alone and among others is the same only where every row takes the same
    # kernel: with the tensor-core prefill on (the default), a step that prefills a long prompt
    # computes its other rows without key splits, and the rounding differs (issue 27's
    # deterministic mode is where bf16 batch invariance belongs). So bf16 is checked on the
    # scalar kernel alone (test-gpu.sh's MLXD_CUDA_PREFILL_KERNEL=0 pass), f32 always.
    scalar = os.environ.get("MLXD_CUDA_PREFILL_KERNEL") == "0"
    for dtype in ["f32", "bf16"] if scalar else ["f32"]:
        run(f"qwen2 safetensors {dtype} batch invariance", f"{fx}/qwen2/f32", ["--dtype", dtype],
            f32["sequences"] + f32["batch"]["members"], 0.0,
            check=lambda name, server, seqs, _tol: batch_invariance(name, server, seqs))
    run("qwen2 safetensors bf16 structured output", f"{fx}/qwen2/f32", ["--dtype", "bf16"], f32["sequences"], 0.0,
        check=lambda name, server, seqs, _tol: structured_output(name, server, seqs))
    run("qwen3 safetensors bf16 forced tool calls", f"{fx}/qwen3/f32", ["--dtype", "bf16"], f32["sequences"], 0.0,
        check=lambda name, server, seqs, _tol: forced_tool_calls(name, server, seqs))
    for dtype in ["f32", "bf16"]:
        name = f"qwen2 safetensors {dtype} kv disk restart"
        if a.only in name and not os.path.exists(f"{fx}/qwen2/f32"):
            lines.append(f"SKIP {name}: {fx}/qwen2/f32 not here")
        elif a.only in name:
            ok, line = kv_disk_restart(name, a.bin, f"{fx}/qwen2/f32", dev + ["--dtype", dtype],
                                       f32["sequences"] + f32["batch"]["members"])
            failed += not ok
            lines.append(line)
            print(line, flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for arch in ARCHS:
        refs = load(f"{here}/../data/embeddings/{arch}.json")["prompts"]
        run(f"{arch} safetensors f32 embeddings", f"{fx}/{arch}/f32", ["--dtype", "f32"], refs, 0.0,
            check=lambda name, server, refs, _tol: embeddings(name, server, refs))
    run("qwen2 safetensors f32 device sampler", f"{fx}/qwen2/f32", ["--dtype", "f32"],
        f32["sequences"], 0.0, check=lambda name, server, seqs, _tol: device_sampler(name, server, seqs))
    exact = os.environ.get("MLXD_CUDA_FORCE_DMMV") == "1"
    tolerances = {"f32": 1e-9}
    if os.path.exists(f"{fx}/gguf/refs/llama-q8_0.json"):
        for kind in ["q8_0", "q4_0"]:
            tolerances[kind] = 1e-9 if exact else quant_tolerance(fx, kind)
    for arch in ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"]:
        for kind, tol in tolerances.items():
            path = f"{fx}/gguf/refs/{arch}-{kind}.json"
            if not os.path.exists(path):
                continue
            refs = load(path)
            alternatives = None
            if kind == "f32":
                run_refs = refs["other_runs"]["f32_attention"]
            elif exact:
                run_refs = refs["other_runs"]["dequantized_f32"]
            else:
                run_refs, alternatives = refs, refs["other_runs"]["dequantized_f32"]["sequences"]
            seqs = [dict(s, prompt_ids=p["prompt_ids"]) for s, p in zip(run_refs["sequences"], refs["sequences"])]
            mode = " exact dequantization (DMMV)" if exact and kind != "f32" else ""
            run(f"{arch} gguf {kind}{mode}", f"{fx}/gguf/{arch}-{kind}.gguf", [], seqs, tol,
                margins_key="llamacpp_top2_logit_margins", alternatives=alternatives)
    # The families whose fixtures live in tests/data: transformers' f32 logits, mlx-lm's exact
    # logits of the 4-bit folders (dequantized on a GPU, so the same arithmetic), and
    # llama.cpp's runs of the GGUF files: F32 exactly; quantized ones as the shared fixtures'
    # (either llama.cpp's own run or its run of the exactly dequantized weights, up to the
    # larger of the near-ties the CPU tests allow and those of the shared fixtures; with exact
    # dequantization, the dequantized run exactly).
    # gpt-oss: attention sinks in the paged kernel; MXFP4 experts (the folder's `_blocks` and
    # the GGUF's type 39) dequantized once on a GPU, so the same arithmetic as transformers'
    # dequantized run and llama.cpp's run of the dequantized file.
    # Images: the SigLIP tower and projector on the device, the soft tokens' bidirectional
    # attention in the gathered path.
    root = f"{here}/../data/gemma3_vision"
    vision_refs = [dict(s, greedy_ids=s["greedy"]) for s in data_refs(f"{root}/refs", "transformers-f32")]
    for dtype, tol in [("f32", F32_TOL), ("bf16", BF16_DATA_TOL)]:
        run(f"gemma3 vision safetensors {dtype}", f"{root}/f32", ["--dtype", dtype], vision_refs, tol,
            check=lambda name, server, seqs, tol: vision(name, server, seqs, tol, f"{root}/images"))
    for variant, root, tie in [("dense", "gemma4/dense", 0.4), ("moe", "gemma4/moe", 1.0),
                               ("qwen3_moe", "moe/qwen3_moe", 0.15), ("mixtral", "moe/mixtral", 0.15),
                               ("gpt_oss", "gpt_oss", 0.15)]:
        label, root = f"{variant} ({root})", f"{here}/../data/{root}"
        run(f"{label} safetensors f32", f"{root}/f32", ["--dtype", "f32"],
            data_refs(f"{root}/refs", "transformers-f32"), F32_TOL)
        # bf16 (experts grouped on the device with MLXD_CUDA_GROUPED_EXPERTS=1: test-gpu.sh's
        # grouped pass), against transformers' f32 run up to bf16's rounding (the vision
        # check's bound).
        run(f"{label} safetensors bf16", f"{root}/f32", ["--dtype", "bf16"],
            data_refs(f"{root}/refs", "transformers-f32"), max(tie, BF16_DATA_TOL))
        if os.path.exists(f"{root}/refs/transformers-mxfp4.json"):
            run(f"{label} mxfp4 safetensors (dequantized) f32", f"{root}/mxfp4", ["--dtype", "f32"],
                data_refs(f"{root}/refs", "transformers-mxfp4"), F32_TOL)
        for folder in ["mlx-q4", "mlx-mxfp4"]:
            if os.path.exists(f"{root}/refs/{folder}-exact.json"):
                run(f"{label} {folder} (dequantized) f32", f"{root}/{folder}", ["--dtype", "f32"],
                    data_refs(f"{root}/refs", f"{folder}-exact"), F32_TOL)
        for kind in ["f32", "q8_0", "q4_0", "mxfp4", "mxfp4_moe"]:
            path = f"{root}/refs/llamacpp-{kind}.json"
            if not os.path.exists(path):
                continue
            refs, alternatives = load(path), None
            if kind == "f32":
                seqs, tol = refs["sequences"], 1e-9
            elif exact and (variant, kind) in ODD_BLOCK_ROWS:
                lines.append(f"SKIP {label} gguf {kind} exact dequantization (DMMV): {ODD_BLOCK_ROWS_WHY}")
                continue
            elif exact:
                seqs, tol = refs["other_runs"]["dequantized_f32"]["sequences"], 1e-9
            else:
                # MXFP4_MOE files keep their other matrices in Q8_0: Q8_0's near-ties apply.
                seqs, tol = refs["sequences"], max(tie, tolerances.get(QUANTIZED_AS.get(kind, kind), tie))
                alternatives = refs["other_runs"]["dequantized_f32"]["sequences"]
            mode = " exact dequantization (DMMV)" if exact and kind != "f32" else ""
            run(f"{label} gguf {kind}{mode}", f"{root}/gguf/{variant}-{kind}.gguf", [], seqs, tol,
                margins_key="llamacpp_top2_logit_margins", alternatives=alternatives)
    # A request alone and among 7 others through bf16 experts (issue 21 item 4; grouped on the
    # device with MLXD_CUDA_GROUPED_EXPERTS=1, where each row's expert products sum in the same
    # order whatever tile it lands in). On the scalar attention pass only, as qwen2's bf16 check
    # above (the GGUF files would not test the experts: candle's quantized matmuls take other
    # kernels at other batch sizes).
    if scalar:
        moe = f"{here}/../data/moe/qwen3_moe"
        run("qwen3_moe (moe/qwen3_moe) safetensors bf16 batch invariance", f"{moe}/f32", ["--dtype", "bf16"],
            data_refs(f"{moe}/refs", "transformers-f32"), 0.0,
            check=lambda name, server, seqs, _tol: batch_invariance(name, server, seqs))
    summary = f"{len(lines) - failed} passed, {failed} failed"
    print(summary)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines + [summary]) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
