"""Embeddings through the official `openai` and `ollama` packages, checked against
transformers: every fixture family's final hidden states, mean- and last-token-pooled and
L2-normalised (`tests/data/embeddings/*.json`, made by `make_refs.py` there), single inputs and
batches alike, while other requests generate in the same engine steps."""

import base64
import concurrent.futures
import json
import struct
import urllib.request

import numpy as np
import ollama
import openai
import pytest

from conftest import ROOT, _start

SHARED = ROOT.parent / "shared"
REFS = ROOT / "tests" / "data" / "embeddings"
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "phi3-longrope"]
#: f32 vectors of unit length; transformers and mlxd agree to ~1e-6 here.
TOLERANCE = 1e-4


def refs(arch):
    return json.loads((REFS / f"{arch}.json").read_text())["prompts"]


@pytest.fixture(scope="module", params=ARCHS)
def served(request):
    arch = request.param
    for url in _start(["--served-model-name", "m"], model=SHARED / "fixtures" / arch / "f32"):
        yield arch, url


def close(got, want):
    return float(np.max(np.abs(np.array(got) - np.array(want)))) <= TOLERANCE


def test_vectors_equal_the_reference_single_or_batched(served):
    arch, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompts = refs(arch)
    names = list(prompts)
    batch = client.embeddings.create(model="m", input=[prompts[n]["ids"] for n in names])
    assert [d.index for d in batch.data] == list(range(len(names)))
    assert batch.usage.prompt_tokens == sum(len(prompts[n]["ids"]) for n in names)
    for n, d in zip(names, batch.data):
        assert close(d.embedding, prompts[n]["mean"]), (arch, n)
        single = client.embeddings.create(model="m", input=prompts[n]["ids"]).data[0].embedding
        assert close(single, d.embedding), (arch, n)


def test_embeddings_share_steps_with_generation(served):
    """Embeddings submitted while chats stream come out the same."""
    arch, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompts = refs(arch)

    def chat():
        return client.completions.create(model="m", prompt=prompts["p33"]["ids"], max_tokens=24, temperature=0).usage

    def embed(name):
        return name, client.embeddings.create(model="m", input=prompts[name]["ids"]).data[0].embedding

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(chat) for _ in range(3)]
        embeds = [pool.submit(embed, n) for n in list(prompts) * 2]
        for f in embeds:
            name, vector = f.result()
            assert close(vector, prompts[name]["mean"]), (arch, name)
        assert all(c.result().completion_tokens == 24 for c in chats)


def test_encodings_dimensions_and_refusals(served):
    arch, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    ids = refs(arch)["p7"]["ids"]
    floats = client.embeddings.create(model="m", input=ids).data[0].embedding
    raw = client.embeddings.with_raw_response.create(model="m", input=ids, encoding_format="base64")
    packed = base64.b64decode(json.loads(raw.text)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == floats
    short = client.embeddings.create(model="m", input=ids, dimensions=8).data[0].embedding
    head = np.array(floats[:8])
    assert close(short, head / np.linalg.norm(head))
    for bad, field in [(dict(input=ids, dimensions=0), "dimensions"), (dict(input=[]), "input"),
                       (dict(input=ids, encoding_format="int8"), "encoding_format"),
                       (dict(input=[[10**7]]), "input"), (dict(input=ids, extra_body={"pooling": "x"}), "pooling")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="m", **bad)
        assert e.value.body["param"] == field, (bad, e.value.body)


def test_ollama_embed_routes(served):
    arch, url = served
    client = ollama.Client(host=url)
    texts = ["The keeper climbed the stairs", "A small boat", "fox"]
    batch = client.embed(model="m", input=texts).embeddings
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    for text, vector in zip(texts, batch):
        assert close(vector, client.embed(model="m", input=text).embeddings[0])
        assert close(vector, oai.embeddings.create(model="m", input=text).data[0].embedding)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
    old = client.embeddings(model="m", prompt=texts[0]).embedding
    assert close(old, batch[0])
    with pytest.raises(ollama.ResponseError):
        client.embed(model="m", input=texts, options={"temperature": 0.5})


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    raise KeyError(name)


def test_last_token_pooling_uses_the_prefix_cache_and_truncation(tmp_path_factory):
    """`--pooling last` gives the last token's state; a repeated long input then reuses the
    cached prefix (mean pooling cannot: it needs every token's state)."""
    for url in _start(["--served-model-name", "m", "--pooling", "last", "--max-model-len", "64"],
                      model=SHARED / "fixtures" / "qwen3" / "f32"):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        prompts = refs("qwen3")
        for name, p in prompts.items():
            got = client.embeddings.create(model="m", input=p["ids"]).data[0].embedding
            assert close(got, p["last"]), name
        hits = metric(url, "mlxd_prefix_cache_hits_total")
        again = client.embeddings.create(model="m", input=prompts["p33"]["ids"]).data[0].embedding
        assert close(again, prompts["p33"]["last"])
        assert metric(url, "mlxd_prefix_cache_hits_total") >= hits + 32
        # Longer than the 64-token context: refused by OpenAI's route, cut by Ollama's.
        long_text = "the keeper climbed the stairs " * 40
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="m", input=long_text)
        ol = ollama.Client(host=url)
        assert len(ol.embed(model="m", input=long_text).embeddings[0]) == 64
        with pytest.raises(ollama.ResponseError):
            ol.embed(model="m", input=long_text, truncate=False)
