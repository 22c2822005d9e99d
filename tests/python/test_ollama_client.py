"""mlxd driven by the official `ollama` Python package."""

import json
import urllib.request

import ollama
import openai
import pytest

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def client(server_url):
    return ollama.Client(host=server_url)


def test_generate_non_streaming(client):
    r = client.generate(model="stories260k", prompt="Once upon a time", raw=True, options={**GREEDY, "num_predict": 20})
    assert r.done and r.done_reason == "length"
    assert r.response.startswith(", there was a little girl named Lily.")
    assert r.eval_count == 20 and r.prompt_eval_count == 5
    assert len(r.context) == 25


def test_generate_streaming_equals_non_streaming(client):
    opts = {**GREEDY, "num_predict": 30}
    full = client.generate(model="stories260k", prompt="The cat", raw=True, options=opts)
    parts = list(client.generate(model="stories260k", prompt="The cat", raw=True, options=opts, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == full.response
    assert parts[-1].context == full.context


def test_generate_equals_openai_completions(client, server_url):
    r = client.generate(model="stories260k:latest", prompt="Lily and Ben", raw=True, options={**GREEDY, "num_predict": 32})
    oa = openai.OpenAI(base_url=server_url + "/v1", api_key="unused")
    c = oa.completions.create(model="stories260k", prompt="Lily and Ben", max_tokens=32, temperature=0)
    assert r.response == c.choices[0].text


def test_context_round_trip_continues(client):
    first = client.generate(model="stories260k", prompt="Once upon a time", raw=True, options={**GREEDY, "num_predict": 10})
    second = client.generate(model="stories260k", prompt="", raw=True, context=first.context,
                             options={**GREEDY, "num_predict": 10})
    whole = client.generate(model="stories260k", prompt="Once upon a time", raw=True, options={**GREEDY, "num_predict": 20})
    assert first.response + second.response == whole.response


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "Tell me about a dog."}]
    full = client.chat(model="stories260k", messages=messages, options={**GREEDY, "num_predict": 25})
    assert full.message.role == "assistant" and full.message.content
    parts = list(client.chat(model="stories260k", messages=messages, options={**GREEDY, "num_predict": 25}, stream=True))
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].done and parts[-1].eval_count == full.eval_count


def test_list_show_ps(client):
    models = client.list().models
    assert [m.model for m in models] == ["stories260k:latest"]
    assert models[0].details.parameter_size == "260K"
    shown = client.show("stories260k")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.details.family == "llama"
    assert "completion" in shown.capabilities
    running = client.ps().models
    assert running[0].model == "stories260k:latest"
    assert running[0].expires_at is not None


def test_version(server_url):
    with urllib.request.urlopen(server_url + "/api/version") as r:
        assert json.load(r)["version"]


def test_unknown_model_raises_response_error(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nope", prompt="hi")
    assert e.value.status_code == 404
    assert "not found" in e.value.error


def test_pull_says_there_is_no_registry(server_url):
    c = ollama.Client(host=server_url)
    with pytest.raises(ollama.ResponseError) as err:
        c.pull("qwen2.5:0.5b")
    assert "no registry access" in str(err.value)
