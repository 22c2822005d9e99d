"""mlxd driven by the official `openai` Python package."""

import openai
import pytest

from conftest import _start

MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
]


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused")


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["stories260k"]


def test_chat_completion(client):
    r = client.chat.completions.create(model="stories260k", messages=MESSAGES, max_tokens=30, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 30


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="stories260k", messages=MESSAGES, max_tokens=40, temperature=0)
    stream = client.chat.completions.create(
        model="stories260k", messages=MESSAGES, max_tokens=40, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_matches_the_reference_text(client):
    r = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert r.choices[0].text.startswith(", there was a little girl named Lily.")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="stories260k", prompt="The dog", max_tokens=40, temperature=0)
    stream = client.completions.create(model="stories260k", prompt="The dog", max_tokens=40, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == full.choices[0].text


def test_stop_string_is_not_emitted(client):
    r = client.completions.create(
        model="stories260k", prompt="Once upon a time", max_tokens=40, temperature=0, stop=["Lily"],
    )
    assert r.choices[0].text == ", there was a little girl named "
    assert r.choices[0].finish_reason == "stop"


def test_bad_request_raises_with_openai_error_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories260k", messages=[], max_tokens=5)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "messages"


def test_a_budget_past_the_context_ends_there_or_is_refused_when_strict(client):
    r = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=1000,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 512
    for url in _start(["--strict-context"]):
        strict = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            strict.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=1000)
        assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=5)
