#!/usr/bin/env python3
"""GGUF copies of the MoE and Gemma 4 fixtures, made by llama.cpp's own tools, and llama.cpp's
greedy references for them, for tests/moe_models.rs and tests/gemma4_models.rs.

    # llama.cpp from the pinned tree benches/vs_llama_cpp.sh builds (WORK=/work/bench there),
    # with llama-server and llama-quantize built; a Python with torch and transformers.
    python tests/data/moe/make_gguf.py --llama-cpp /work/bench/llama.cpp --out tests/data/moe
    python tests/data/moe/make_gguf.py --llama-cpp /work/bench/llama.cpp --out tests/data/gemma4 dense moe
    python tests/data/moe/make_gguf.py --llama-cpp /work/bench/llama.cpp --out tests/data gpt_oss

Per architecture: <arch>/gguf/<arch>-{f32,q8_0,q4_0}.gguf (convert_hf_to_gguf.py to F32 and
Q8_0, llama-quantize F32 -> Q4_0; gpt_oss also -mxfp4, the converter's copy of the MXFP4 folder
with the experts' blocks kept and every other tensor F32, as ggml-org's gpt-oss GGUFs are made,
and -mxfp4_moe, llama-quantize's MXFP4_MOE: experts MXFP4, the rest Q8_0) and
<arch>/refs/llamacpp-<type>.json: for every prompt of
transformers-f32.json, llama-server's greedy ids (temperature 0, top-k 1, no prompt cache,
float32 KV and attention) and llama.cpp's own top-1/top-2 log-probability gap at each step, so a
test can tell a real divergence from a near-tie; for the quantized files also
`other_runs.dequantized_f32`, the same run of the file's weights dequantized exactly
(`llama-quantize --allow-requantize … F32`), which computes in float32 as a GPU's exact
dequantizing matmuls do. The converter's pre-tokenizer lookup does not
know the fixtures' tiny tokenizers: the family's name is pinned instead (`PIN_PRE`; Gemma 4's
converter names its own tokenizer; the gpt-oss fixture's is Qwen's BPE with harmony's tokens).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PIN_PRE = {"qwen3_moe": "qwen2", "mixtral": "llama-bpe", "gpt_oss": "qwen2"}
DEFAULT_ARCHS = ["qwen3_moe", "mixtral"]
TYPES = ["f32", "q8_0", "q4_0"]
EXTRA_TYPES = {"gpt_oss": ["mxfp4", "mxfp4_moe"]}


def convert(llama_cpp, folder, outtype, outfile, pin):
    code = f"""
import sys
sys.path.insert(0, {str(llama_cpp)!r}); sys.path.insert(1, {str(llama_cpp / 'gguf-py')!r})
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def pinned(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return {pin!r}
base.TextModel.get_vocab_base_pre = pinned
import convert_hf_to_gguf as conv
sys.argv = ["convert_hf_to_gguf.py", "--outtype", {outtype!r}, "--outfile", {str(outfile)!r}, {str(folder)!r}]
conv.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def greedy(port, prompt, steps):
    """`steps` greedy ids and llama.cpp's top-2 log-probability gap at each; an end-of-generation
    token does not stop the reference (the request goes on from prompt + tokens so far)."""
    ids, margins = [], []
    while len(ids) < steps:
        r = post(port, "/completion", {
            "prompt": prompt + ids, "n_predict": steps - len(ids), "temperature": 0, "top_k": 1,
            "samplers": ["top_k"], "cache_prompt": False, "n_probs": 2, "return_tokens": True,
        })
        toks = r.get("tokens") or []
        if not toks:
            break
        probs = r.get("completion_probabilities") or []
        for k, tok in enumerate(toks):
            top = probs[k]["top_logprobs"] if k < len(probs) else []
            margins.append(round(top[0]["logprob"] - top[1]["logprob"], 6) if len(top) > 1 else None)
        ids += toks
    return ids[:steps], margins[:steps]


def references(server_bin, gguf, seqs, steps):
    port = free_port()
    cmd = [str(server_bin), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", "1",
           "-c", "512", "-np", "1", "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        out = []
        for s in seqs:
            ids, margins = greedy(port, s["prompt_ids"], steps)
            out.append({"name": s["name"], "prompt_ids": s["prompt_ids"], "greedy_ids": ids,
                        "llamacpp_top2_logit_margins": margins})
        return out
    finally:
        proc.terminate()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-cpp", type=Path, required=True, help="the pinned llama.cpp tree, built")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", help="make only these types (default: all of the arch's)")
    p.add_argument("archs", nargs="*", default=DEFAULT_ARCHS)
    a = p.parse_args()
    bins = a.llama_cpp / "build" / "bin"
    for arch in a.archs:
        folder, gdir, refs = a.out / arch / "f32", a.out / arch / "gguf", a.out / arch / "refs"
        gdir.mkdir(parents=True, exist_ok=True)
        types = [t for t in TYPES + EXTRA_TYPES.get(arch, []) if not a.only or t in a.only]
        files = {t: gdir / f"{arch}-{t}.gguf" for t in TYPES + EXTRA_TYPES.get(arch, [])}
        if not (files["f32"].exists() and a.only and "f32" not in a.only):
            convert(a.llama_cpp, folder, "f32", files["f32"], PIN_PRE.get(arch))
        if "q8_0" in types:
            convert(a.llama_cpp, folder, "q8_0", files["q8_0"], PIN_PRE.get(arch))
        if "q4_0" in types:
            subprocess.run([str(bins / "llama-quantize"), str(files["f32"]), str(files["q4_0"]), "Q4_0"],
                           check=True, capture_output=True)
        if "mxfp4" in types:
            convert(a.llama_cpp, a.out / arch / "mxfp4", "f32", files["mxfp4"], PIN_PRE.get(arch))
        if "mxfp4_moe" in types:
            subprocess.run([str(bins / "llama-quantize"), str(files["f32"]), str(files["mxfp4_moe"]), "MXFP4_MOE"],
                           check=True, capture_output=True)
        tf = json.loads((refs / "transformers-f32.json").read_text())
        for t in types:
            seqs = references(bins / "llama-server", files[t], tf["sequences"], tf["greedy_steps"])
            meta = {"llama_cpp": "llama-cpp-python 0.3.36 sdist (benches/vs_llama_cpp.sh)",
                    "run": "-fa off -ctk f32 -ctv f32", "greedy_steps": tf["greedy_steps"], "sequences": seqs}
            if t != "f32":
                deq = gdir / f"{arch}-{t}-dequantized.gguf.tmp"
                subprocess.run([str(bins / "llama-quantize"), "--allow-requantize", str(files[t]), str(deq), "F32"],
                               check=True, capture_output=True)
                deq_seqs = references(bins / "llama-server", deq, tf["sequences"], tf["greedy_steps"])
                meta["other_runs"] = {"dequantized_f32": {"sequences": deq_seqs}}
                deq.unlink()
            (refs / f"llamacpp-{t}.json").write_text(json.dumps(meta) + "\n")
            print(f"{arch}-{t}: {[s['greedy_ids'][:6] for s in seqs]}")


if __name__ == "__main__":
    main()
