"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) through the official
`anthropic` package: plain and streamed messages (the SDK's own stream helper and its
accumulated final message), tool use round trips, thinking, stop sequences, token counting,
the prefix cache in `usage`, and errors in Anthropic's shape.

The model is the tiny random-weight Qwen3 fixture with Qwen3's real chat template (tools as
`<tool_call>` JSON); thinking uses the Qwen3.5 template, whose generation prompt opens the
thought, so that a random model's reply is a thought until the answer is asked for."""

import json
import re
from pathlib import Path

import anthropic
import jsonschema
import pytest

from conftest import _start
from test_tools_reasoning import SHARED, TIME, WEATHER, model_with_template

TOOLS = [
    {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER,
     "input_examples": [{"city": "Oslo", "unit": "celsius"}], "strict": True, "cache_control": {"type": "ephemeral"}},
    {"name": "get_time", "description": "Time in a zone", "input_schema": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def qwen_template(name: str) -> str:
    if name == "qwen3":
        return json.loads((SHARED / "tokenizers/qwen3/tokenizer_config.json").read_text())["chat_template"]
    return (SHARED / "tokenizers/chat_templates/Qwen3.5-4B.jinja").read_text()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = model_with_template(tmp_path_factory.mktemp("anthropic"), "qwen3", qwen_template("qwen3"))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    folder = model_with_template(tmp_path_factory.mktemp("anthropic-think"), "qwen3", qwen_template("qwen3.5"))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def blocks(message):
    """A message's content as plain tuples, for comparing whole and streamed replies."""
    out = []
    for b in message.content:
        if b.type == "text":
            out.append(("text", b.text))
        elif b.type == "thinking":
            out.append(("thinking", b.thinking))
        elif b.type == "tool_use":
            out.append(("tool_use", b.name, json.dumps(b.input, sort_keys=True)))
        else:
            raise AssertionError(f"unexpected block {b.type}")
    return out


def test_a_plain_message_and_its_stream_are_the_same(client):
    kwargs = dict(model="m", max_tokens=24, extra_body={"temperature": 0}, system="You are terse.",
                  messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    whole = client.messages.create(**kwargs)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "m"
    assert whole.id.startswith("msg_")
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.output_tokens > 0
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens > 0
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert blocks(final) == blocks(whole)
    assert text == "".join(b.text for b in whole.content if b.type == "text")
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_a_repeated_prompt_is_read_from_the_prefix_cache(client):
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper " * 8}]
    first = client.messages.create(model="m", max_tokens=2, extra_body={"temperature": 0}, messages=messages)
    again = client.messages.create(model="m", max_tokens=2, extra_body={"temperature": 0}, messages=messages)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total
    assert again.usage.cache_read_input_tokens >= total // 2, again.usage
    counted = client.messages.count_tokens(model="m", messages=messages)
    assert counted.input_tokens == total


def test_a_stop_sequence_ends_the_reply_and_is_named(client):
    kwargs = dict(model="m", max_tokens=30, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Count"}])
    text = client.messages.create(**kwargs).content[0].text
    stop = text[6:9]
    assert len(stop) == 3, text
    whole = client.messages.create(stop_sequences=[stop], **kwargs)
    assert whole.stop_reason == "stop_sequence" and whole.stop_sequence == stop
    assert "".join(b.text for b in whole.content) == text[:text.index(stop)]
    with client.messages.stream(stop_sequences=[stop], **kwargs) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, blocks(final)) == ("stop_sequence", stop, blocks(whole))


def check_tool_uses(message, allowed=SCHEMAS):
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses, message
    for use in uses:
        assert use.name in allowed, use.name
        jsonschema.validate(use.input, allowed[use.name])
        assert use.id
    return uses


def test_a_forced_tool_use_round_trips(client):
    for temperature in (0.0, 0.8, 1.2):
        message = client.messages.create(model="m", max_tokens=80, extra_body={"temperature": temperature}, messages=ASK,
                                         tools=TOOLS, tool_choice={"type": "any"})
        assert message.stop_reason == "tool_use"
        uses = check_tool_uses(message)
    history = ASK + [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": uses[0].id, "content": [{"type": "text", "text": "18 degrees"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    reply = client.messages.create(model="m", max_tokens=8, extra_body={"temperature": 0}, messages=history, tools=TOOLS)
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    failed = history[:-1] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "no such city", "is_error": True}]}]
    counted = client.messages.count_tokens(model="m", messages=failed, tools=TOOLS)
    plain = client.messages.count_tokens(model="m", messages=failed[:1], tools=TOOLS)
    assert counted.input_tokens > plain.input_tokens


def test_a_streamed_tool_use_equals_the_whole_one(client):
    kwargs = dict(model="m", max_tokens=80, extra_body={"temperature": 0}, messages=ASK, tools=TOOLS,
                  tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    whole = client.messages.create(**kwargs)
    uses = check_tool_uses(whole, {"get_time": TIME})
    assert len(uses) == 1
    with client.messages.stream(**kwargs) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert blocks(final) == blocks(whole) and final.stop_reason == "tool_use"
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "input_json" in events  # the SDK's event for each input_json_delta


def test_tool_choice_none_gives_text_and_bad_tools_are_refused(client):
    plain = client.messages.create(model="m", max_tokens=5, extra_body={"temperature": 0}, messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "none"})
    assert all(b.type == "text" for b in plain.content)
    bad = [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.source"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages.0.content.0.type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "budget_tokens"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ]
    for extra, field in bad:
        kwargs = dict(model="m", max_tokens=5, messages=ASK)
        kwargs.update(extra)
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(**kwargs)
        body = e.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert field in body["error"]["message"], (extra, body)


def test_errors_have_anthropic_s_shape(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", cast_to=object, body={"model": "m", "messages": ASK})
    assert e.value.body["error"]["message"] == "max_tokens: Field required"
    assert e.value.status_code == 400
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=5, messages=ASK, extra_body={"frobnicate": 1})
    assert "frobnicate" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=5, messages=ASK, container="cntr_1")
    assert "container" in e.value.body["error"]["message"]
    too_long = [{"role": "user", "content": "x" * 200_000}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=5, messages=too_long)
    assert e.value.body["error"]["type"] == "invalid_request_error"
    # Anthropic's words and counts, which Claude Code reads to compact the conversation.
    said = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", e.value.body["error"]["message"])
    assert said, e.value.body
    assert int(said[1]) == client.messages.count_tokens(model="m", messages=too_long).input_tokens
    assert int(said[2]) == 40960 - 1  # the fixture's context, less the one token a reply needs
    # The server still serves.
    assert client.messages.create(model="m", max_tokens=2, messages=ASK).usage.output_tokens == 2


def test_thinking_comes_back_as_thinking_blocks_streamed_or_not(thinker):
    kwargs = dict(model="m", max_tokens=1100, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Why?"}],
                  thinking={"type": "enabled", "budget_tokens": 1024})
    whole = thinker.messages.create(**kwargs)
    assert whole.content and whole.content[0].type == "thinking", blocks(whole)
    assert whole.content[0].thinking
    with thinker.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert blocks(final) == blocks(whole)
    # Disabled: the template closes the thought in the prompt, and the reply is text.
    off = thinker.messages.create(model="m", max_tokens=12, extra_body={"temperature": 0}, messages=kwargs["messages"],
                                  thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"], blocks(off)
    # A thought passed back in the history renders (the template drops or keeps it).
    history = kwargs["messages"] + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                          {"type": "text", "text": "Because."}]},
        {"role": "user", "content": "Sure?"},
    ]
    assert thinker.messages.count_tokens(model="m", messages=history).input_tokens > 0


def test_structured_output_follows_the_schema_streamed_or_not(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    kwargs = dict(model="m", max_tokens=60, messages=ASK, extra_body={"temperature": 0.7},
                  output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
                  cache_control={"type": "ephemeral"}, service_tier="auto")
    whole = client.messages.create(**kwargs)
    assert [b.type for b in whole.content] == ["text"] and whole.stop_reason == "end_turn"
    jsonschema.validate(json.loads(whole.content[0].text), schema)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    jsonschema.validate(json.loads(final.content[0].text), schema)


def test_adaptive_thinking_and_omitted_display(thinker):
    messages = [{"role": "user", "content": "Why?"}]
    adaptive = thinker.messages.create(model="m", max_tokens=16, messages=messages, extra_body={"temperature": 0},
                                       thinking={"type": "adaptive"})
    assert [b.type for b in adaptive.content] == ["thinking"], blocks(adaptive)
    omitted = thinker.messages.create(model="m", max_tokens=16, messages=messages, extra_body={"temperature": 0},
                                      thinking={"type": "adaptive", "display": "omitted"})
    assert omitted.content == [] and omitted.usage.output_tokens == 16
