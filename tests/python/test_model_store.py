"""Many models from where users keep them, through the official `ollama` and `openai`
packages: an Ollama store (manifests and sha256-named blobs, with parameters and a system
prompt) built from the GGUF fixtures, and a Hugging Face hub cache built from a safetensors
fixture. Two models interleaved, keep_alive expiry and 0, LRU unloading under a budget of one
model, a corrupt blob refused by its digest, 404s that name the close matches."""

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import openai
import pytest

from conftest import ROOT, _start

SHARED = ROOT.parent / "shared"
SYSTEM = "You answer in one word."
PARAMS = {"temperature": 0.0, "num_predict": 6, "stop": ["<|im_end|>"], "penalize_newline": True}


def add_blob(store: Path, data: bytes, digest: str = None) -> str:
    digest = digest or hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return digest


def add_model(store: Path, name: str, tag: str, gguf: Path, corrupt=False):
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if corrupt:
        data = data[:-1] + bytes([data[-1] ^ 0xFF])
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{add_blob(store, data, digest)}",
               "size": len(data)}]
    for media, blob in [("params", json.dumps(PARAMS).encode()), ("system", SYSTEM.encode())]:
        layers.append({"mediaType": f"application/vnd.ollama.image.{media}",
                       "digest": f"sha256:{add_blob(store, blob)}", "size": len(blob)})
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    store = root / "ollama"
    add_model(store, "qwen2", "tiny", SHARED / "fixtures/gguf/qwen2-q8_0.gguf")
    add_model(store, "llama", "tiny", SHARED / "fixtures/gguf/llama-q8_0.gguf")
    add_model(store, "broken", "latest", SHARED / "fixtures/gguf/gemma3-q8_0.gguf", corrupt=True)
    hub = root / "hub"
    repo = hub / "models--mlxd--qwen3-tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in (SHARED / "fixtures/qwen3/f32").iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return store, hub


def serve(stores, *extra):
    store, hub = stores
    return _start(["--ollama-models", str(store), "--hf-cache", str(hub), *extra], model="qwen2:tiny")


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.loads(r.read())


def loaded(client):
    return sorted(m.model for m in client.ps().models)


def wait_for(predicate, seconds=5.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_every_model_is_listed_and_served(stores):
    for url in serve(stores, "--keep-alive", "-1"):
        client = ollama.Client(host=url)
        names = sorted(m.model for m in client.list().models)
        assert names == ["broken:latest", "llama:tiny", "mlxd/qwen3-tiny:latest", "qwen2:tiny"], names
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert sorted(m.id for m in oai.models.list().data) == ["broken:latest", "llama:tiny", "mlxd/qwen3-tiny",
                                                                  "qwen2:tiny"]
        # Two models interleaved, from several threads at once.
        def ask(model):
            return client.generate(model=model, prompt="Once upon a time", options={"num_predict": 4}).done_reason

        with ThreadPoolExecutor(6) as pool:
            reasons = list(pool.map(ask, ["qwen2:tiny", "llama:tiny", "library/qwen2:tiny", "llama:tiny"] * 2))
        assert set(reasons) <= {"stop", "length"}, reasons
        # The hub cache's repository, by its repository name, through the OpenAI API.
        r = oai.completions.create(model="mlxd/qwen3-tiny", prompt="Once", max_tokens=3, temperature=0)
        assert r.model == "mlxd/qwen3-tiny" and r.usage.completion_tokens == 3
        assert loaded(client) == ["llama:tiny", "mlxd/qwen3-tiny:latest", "qwen2:tiny"]
        # The manifest's system prompt and parameters apply as Ollama applies them.
        show = post(url + "/api/show", {"model": "qwen2:tiny"})
        assert show["system"] == SYSTEM and "temperature 0.0" in show["parameters"], show
        default = client.chat(model="qwen2:tiny", messages=[{"role": "user", "content": "Hi"}])
        explicit = client.chat(model="qwen2:tiny", messages=[{"role": "system", "content": SYSTEM},
                                                             {"role": "user", "content": "Hi"}])
        assert default.prompt_eval_count == explicit.prompt_eval_count
        assert default.eval_count <= PARAMS["num_predict"]
        # Unknown names are 404s naming the close ones.
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="qwen2:tin", prompt="hi")
        assert e.value.status_code == 404 and "qwen2:tiny" in str(e.value)
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="mistral:7b", prompt="hi", max_tokens=1)
        listing = subprocess.run([os.environ.get("MLXD_BIN", str(ROOT / "target/debug/mlxd")), "list",
                                  "--ollama-models", str(stores[0]), "--hf-cache", str(stores[1])],
                                 capture_output=True, text=True, check=True).stdout
        for name in ["qwen2:tiny", "llama:tiny", "mlxd/qwen3-tiny", "broken:latest"]:
            assert name in listing, listing
        # A repository at a revision, offline.
        pinned = subprocess.run([os.environ.get("MLXD_BIN", str(ROOT / "target/debug/mlxd")), "list",
                                 "--model", "mlxd/qwen3-tiny@0123abcd", "--hf-cache", str(stores[1]),
                                 "--ollama-models", str(stores[0])],
                                capture_output=True, text=True, check=True).stdout
        assert "mlxd/qwen3-tiny@0123abcd  huggingface" in pinned and "snapshots/0123abcd" in pinned, pinned


def test_keep_alive_expiry_and_unload(stores):
    for url in serve(stores):
        client = ollama.Client(host=url)
        assert loaded(client) == ["qwen2:tiny"]
        # An empty prompt only loads; keep_alive 0 with an empty prompt unloads.
        r = client.generate(model="llama:tiny", prompt="")
        assert r.done_reason == "load" and "llama:tiny" in loaded(client)
        r = client.generate(model="llama:tiny", prompt="", keep_alive=0)
        assert r.done_reason == "unload"
        assert wait_for(lambda: "llama:tiny" not in loaded(client))
        # keep_alive 0 on a real request: unloaded once it is done.
        client.generate(model="llama:tiny", prompt="Hi", keep_alive=0, options={"num_predict": 2})
        assert wait_for(lambda: "llama:tiny" not in loaded(client))
        # A short keep_alive expires on its own; /api/ps shows when.
        client.generate(model="llama:tiny", prompt="Hi", keep_alive="1s", options={"num_predict": 2})
        ps = {m.model: m for m in client.ps().models}
        assert "llama:tiny" in ps and ps["llama:tiny"].expires_at is not None
        assert wait_for(lambda: "llama:tiny" not in loaded(client), seconds=4)
        # Forever (negative) stays.
        client.generate(model="llama:tiny", prompt="Hi", keep_alive=-1, options={"num_predict": 2})
        time.sleep(1.0)
        assert "llama:tiny" in loaded(client)
        with pytest.raises(ollama.ResponseError):
            client.generate(model="llama:tiny", prompt="Hi", keep_alive="soon")


def test_a_budget_of_one_model_unloads_the_least_recently_used(stores):
    for url in serve(stores, "--max-loaded-models", "1"):
        client = ollama.Client(host=url)
        assert loaded(client) == ["qwen2:tiny"]
        client.generate(model="llama:tiny", prompt="Hi", options={"num_predict": 2})
        assert loaded(client) == ["llama:tiny"]
        client.generate(model="qwen2:tiny", prompt="Hi", options={"num_predict": 2})
        assert loaded(client) == ["qwen2:tiny"]


def test_a_corrupt_blob_is_refused_by_its_digest(stores):
    for url in serve(stores):
        client = ollama.Client(host=url)
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="broken", prompt="Hi")
        assert "sha256" in str(e.value) and "corrupt" in str(e.value), str(e.value)
        # The server and its other models keep working.
        assert client.generate(model="qwen2:tiny", prompt="Hi", options={"num_predict": 2}).done
        assert "broken:latest" not in loaded(client)


def test_mixture_of_experts_models_resolve_from_the_store_like_the_others(tmp_path):
    """Qwen3-MoE, Mixtral and Gemma 4 GGUF files (llama.cpp's qwen3moe, llama with experts, and
    gemma4 dense and with experts) under Ollama names: listed, chatted with through the ollama
    package, described by /api/show."""
    store = tmp_path / "ollama"
    moe = ROOT / "tests/data/moe"
    gemma4 = ROOT / "tests/data/gemma4"
    add_model(store, "qwen3moe", "tiny", moe / "qwen3_moe/gguf/qwen3_moe-q4_0.gguf")
    add_model(store, "mixtral", "tiny", moe / "mixtral/gguf/mixtral-q8_0.gguf")
    add_model(store, "gemma4", "tiny", gemma4 / "dense/gguf/dense-q4_0.gguf")
    add_model(store, "gemma4", "tiny-moe", gemma4 / "moe/gguf/moe-q8_0.gguf")
    names = ["gemma4:tiny", "gemma4:tiny-moe", "mixtral:tiny", "qwen3moe:tiny"]
    for url in _start(["--ollama-models", str(store)], model="qwen3moe:tiny"):
        client = ollama.Client(host=url)
        assert sorted(m.model for m in client.list().models) == names
        for name in names:
            reply = client.chat(model=name, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 4})
            assert reply.done_reason in ("stop", "length") and reply.eval_count <= 6, reply
        show = post(url + "/api/show", {"model": "qwen3moe:tiny"})
        assert show["details"]["family"] == "qwen3moe", show["details"]
        show = post(url + "/api/show", {"model": "gemma4:tiny-moe"})
        assert show["details"]["family"] == "gemma4", show["details"]
