"""`/v1/rerank` (and llama-server's `/rerank`) with a causal reranker: the tiny random Qwen3
made a reranker by tests/data/rerank/make_refs.py (`yes` and `no` in its vocabulary, a name
that says it reranks), its relevance scores against transformers' of the model card's recipe
(tests/data/rerank/refs.json), documents by descending relevance, `top_n`,
`return_documents`, and 400s for bad input and for a model that cannot rerank."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, _start

DATA = ROOT / "tests" / "data" / "rerank"
REFS = json.loads((DATA / "refs.json").read_text())


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def reranker():
    yield from _start([], model=DATA / "qwen3-reranker-tiny")


def test_scores_follow_transformers_and_come_most_relevant_first(reranker):
    for case in REFS["cases"]:
        body = {"query": case["query"], "documents": case["documents"]}
        if case["instruction"]:
            body["instruction"] = case["instruction"]
        status, reply = post(reranker + "/v1/rerank", body)
        assert status == 200, reply
        assert reply["model"] == "qwen3-reranker-tiny"
        results = reply["results"]
        assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
        for r in results:
            assert r["relevance_score"] == pytest.approx(case["scores"][r["index"]], abs=1e-4), (case, r)
            assert r["document"] == {"text": case["documents"][r["index"]]}
        assert sorted(r["index"] for r in results) == list(range(len(case["documents"])))
        assert reply["usage"]["prompt_tokens"] > 0


def test_listings_say_which_models_rerank(reranker, server_url):
    cards = json.load(urllib.request.urlopen(reranker + "/v1/models"))["data"]
    assert [c["details"]["rerank"] for c in cards] == [True]
    cards = json.load(urllib.request.urlopen(server_url + "/v1/models"))["data"]
    assert [c["details"]["rerank"] for c in cards] == [False]


def test_top_n_objects_and_the_llama_server_path(reranker):
    case = REFS["cases"][0]
    documents = [{"text": d} for d in case["documents"]]
    status, reply = post(reranker + "/rerank", {"query": case["query"], "documents": documents, "top_n": 2,
                                                "return_documents": False})
    assert status == 200, reply
    best = sorted(range(len(case["scores"])), key=lambda i: -case["scores"][i])[:2]
    assert [r["index"] for r in reply["results"]] == best
    assert all("document" not in r for r in reply["results"])


def test_bad_requests_and_models_that_cannot_rerank_are_400s(reranker, server_url):
    bad = [
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": [42]}, "documents[0]"),
        ({"query": "q", "documents": [{"text": "a", "title": "b"}]}, "documents[0]"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"], "frobnicate": 1}, "frobnicate"),
        ({"query": "q", "documents": ["a " * 50_000]}, "documents[0]"),
    ]
    for body, param in bad:
        status, reply = post(reranker + "/v1/rerank", body)
        assert status == 400 and reply["error"]["param"] == param, (body, reply)
    status, reply = post(server_url + "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 400 and reply["error"]["param"] == "model" and "cannot rerank" in reply["error"]["message"]
    # The server still serves.
    assert post(reranker + "/v1/rerank", {"query": "q", "documents": ["a"]})[0] == 200
