"""OpenAI's Responses API (`/v1/responses`) through the official `openai` package: plain and
streamed responses (the SDK's stream helper and its accumulated final response), stored
responses continued with `previous_response_id` (reading the prefix cache), `GET` and
`DELETE`, function calls round trips (namespaced ones as Codex offers them), structured
output (`responses.parse`), reasoning items with summaries and sealed thoughts, logprobs,
`max_output_tokens`, and errors in OpenAI's shape.

The model is the tiny random-weight Qwen3 fixture with Qwen3's real chat template; reasoning
uses the Qwen3.5 template, whose generation prompt opens the thought."""

import json

import jsonschema
import openai
import pydantic
import pytest

from conftest import _start
from test_anthropic_client import qwen_template
from test_tools_reasoning import TIME, WEATHER, model_with_template

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER,
     "strict": False},
    {"type": "function", "name": "get_time", "description": "Time in a zone", "parameters": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = model_with_template(tmp_path_factory.mktemp("responses"), "qwen3", qwen_template("qwen3"))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    folder = model_with_template(tmp_path_factory.mktemp("responses-think"), "qwen3", qwen_template("qwen3.5"))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def items(response):
    """A response's output as plain tuples, for comparing whole and streamed responses."""
    out = []
    for item in response.output:
        if item.type == "message":
            out.append(("message", item.status, tuple(p.text for p in item.content)))
        elif item.type == "reasoning":
            out.append(("reasoning", tuple(p.text for p in item.content or []), tuple(s.text for s in item.summary)))
        elif item.type == "function_call":
            out.append(("function_call", item.name, item.arguments, getattr(item, "namespace", None)))
        else:
            raise AssertionError(f"unexpected item {item.type}")
    return out


def streamed(client, **kwargs):
    """A stream's events and the response its terminal event carries (the SDK's
    `get_final_response` knows only `response.completed`; a capped reply ends `incomplete`)."""
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
    return events, events[-1].response


def test_a_plain_response_and_its_stream_are_the_same(client):
    kwargs = dict(model="m", input="Hello there", instructions="You are terse.", max_output_tokens=24,
                  temperature=0, store=False)
    whole = client.responses.create(**kwargs)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == "m"
    assert whole.status in ("completed", "incomplete") and whole.instructions == "You are terse."
    assert whole.output_text and whole.usage.output_tokens > 0
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    events, final = streamed(client, **kwargs)
    assert items(final) == items(whole) and final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"], kinds
    assert kinds[-1] == f"response.{whole.status}"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The same conversation as items, a developer message for the instructions.
    as_items = client.responses.create(model="m", max_output_tokens=24, temperature=0, store=False, input=[
        {"role": "developer", "content": "You are terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]},
    ])
    assert as_items.output_text == whole.output_text


def test_a_stored_response_is_continued_from_the_prefix_cache_then_deleted(client):
    story = "Tell me a long story about a lighthouse keeper. " * 8
    first = client.responses.create(model="m", input=story, max_output_tokens=6, temperature=0)
    assert first.store is True
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="m", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    # The stored conversation (its input, then its output) renders first: its tokens are cached.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16, second.usage
    # The same conversation sent whole renders the same prompt.
    whole = client.responses.create(model="m", max_output_tokens=4, temperature=0, store=False, input=[
        {"role": "user", "content": story},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "And then?"},
    ])
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    deleted = client.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    for call in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="x", previous_response_id=second.id)
    assert e.value.body["param"] == "previous_response_id" and first.id in e.value.body["message"]
    unstored = client.responses.create(model="m", input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def check_calls(response, allowed=SCHEMAS):
    calls = [i for i in response.output if i.type == "function_call"]
    assert calls, items(response)
    for call in calls:
        assert call.name in allowed and call.call_id and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), allowed[call.name])
    return calls


def test_a_forced_call_round_trips_stored_and_stateless(client):
    for temperature in (0.0, 0.8, 1.2):
        first = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice="required",
                                        max_output_tokens=80, temperature=temperature)
        calls = check_calls(first)
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 degrees"} for c in calls]
    stored = client.responses.create(model="m", previous_response_id=first.id, input=outputs, tools=TOOLS,
                                     max_output_tokens=8, temperature=0)
    stateless = client.responses.create(model="m", tools=TOOLS, max_output_tokens=8, temperature=0, store=False,
                                        input=[{"role": "user", "content": ASK}]
                                        + [c.model_dump(exclude_none=True) for c in calls] + outputs)
    assert stateless.usage.input_tokens == stored.usage.input_tokens
    assert items(stateless) == items(stored)
    assert stored.usage.input_tokens_details.cached_tokens > 0


def test_a_streamed_call_equals_the_whole_one_and_names_its_namespace(client):
    tools = TOOLS[:1] + [{"type": "namespace", "name": "clock", "description": "Clocks",
                          "tools": [TOOLS[1]]}, {"type": "web_search", "external_web_access": False}]
    kwargs = dict(model="m", input=ASK, tools=tools, tool_choice={"type": "function", "name": "get_time"},
                  parallel_tool_calls=False, max_output_tokens=80, temperature=0, store=False)
    whole = client.responses.create(**kwargs)
    [call] = check_calls(whole, {"get_time": TIME})
    assert call.model_dump()["namespace"] == "clock"
    events, final = streamed(client, **kwargs)
    kinds = [e.type for e in events]
    assert items(final) == items(whole)
    for kind in ("response.function_call_arguments.delta", "response.function_call_arguments.done",
                 "response.output_item.done", "response.completed"):
        assert kind in kinds, kinds


def test_structured_output_follows_the_schema(client):
    class Trip(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        city: str = pydantic.Field(max_length=10)
        days: int = pydantic.Field(ge=1, le=9)

    parsed = client.responses.parse(model="m", input=ASK, text_format=Trip, max_output_tokens=60, temperature=0.7,
                                    store=False)
    assert isinstance(parsed.output_parsed, Trip), parsed.output_text
    schema = Trip.model_json_schema()
    with client.responses.stream(model="m", input=ASK, max_output_tokens=60, temperature=0.7, store=False,
                                 text={"format": {"type": "json_schema", "name": "trip", "schema": schema}}) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), schema)
    plain = client.responses.create(model="m", input=ASK, max_output_tokens=30, store=False,
                                    text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(plain.output_text), dict)


def test_reasoning_items_carry_the_thought_its_summary_and_a_sealed_copy(thinker):
    kwargs = dict(model="m", input="Why?", max_output_tokens=16, temperature=0, store=False,
                  reasoning={"effort": "medium", "summary": "auto"}, include=["reasoning.encrypted_content"])
    whole = thinker.responses.create(**kwargs)
    [reasoning] = [i for i in whole.output if i.type == "reasoning"]
    thought = reasoning.content[0].text
    assert thought and reasoning.summary[0].text == thought and reasoning.encrypted_content
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens <= whole.usage.output_tokens
    events, final = streamed(thinker, **kwargs)
    assert items(final) == items(whole)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == thought
    # The thought handed back (only sealed) renders as the one handed back in the clear.
    sealed = {"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": reasoning.encrypted_content}
    clear = {"type": "reasoning", "id": reasoning.id, "summary": [], "content": [{"type": "reasoning_text", "text": thought}]}
    answer = {"role": "assistant", "content": [{"type": "output_text", "text": "Because."}]}
    counts = []
    for item in (sealed, clear, {"type": "reasoning", "summary": []}):
        r = thinker.responses.create(model="m", max_output_tokens=1, store=False,
                                     input=[{"role": "user", "content": "Why?"}, item, answer])
        counts.append(r.usage.input_tokens)
    assert counts[0] == counts[1], counts
    # Without a summary asked for there is none; effort none turns thinking off.
    plain = thinker.responses.create(model="m", input="Why?", max_output_tokens=16, temperature=0, store=False)
    assert [i.type for i in plain.output][:1] == ["reasoning"] and plain.output[0].summary == []
    off = thinker.responses.create(model="m", input="Why?", max_output_tokens=8, temperature=0, store=False,
                                   reasoning={"effort": "none"})
    assert [i.type for i in off.output] == ["message"], items(off)


def test_logprobs_and_the_output_cap(client):
    r = client.responses.create(model="m", input="Count", max_output_tokens=5, temperature=0, store=False,
                                include=["message.output_text.logprobs"], top_logprobs=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.status == "incomplete"
    lps = message.content[0].logprobs
    assert len(lps) == r.usage.output_tokens == 5
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in lps)
    events, final = streamed(client, model="m", input="Count", max_output_tokens=5, temperature=0, store=False)
    assert events[-1].type == "response.incomplete" and final.incomplete_details.reason == "max_output_tokens"


def test_bad_requests_are_refused_by_name_and_the_server_serves_on(client):
    bad = [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
         "input[0].content[0].image_url"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "nope"}]}, "input[0].arguments"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"truncation": "sometimes"}, "truncation"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"include": ["everything"]}, "include[0]"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"background": True}, "background"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
    ]
    for extra, field in bad:
        kwargs = dict(model="m", input=ASK, max_output_tokens=5, store=False)
        kwargs.update(extra)
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**kwargs)
        body = e.value.body
        assert body["type"] == "invalid_request_error" and body["param"] == field, (extra, body)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="x" * 200_000)
    assert e.value.body["code"] == "context_length_exceeded", e.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=ASK)
    assert client.responses.create(model="m", input=ASK, max_output_tokens=2, store=False).usage.output_tokens == 2


def test_truncation_auto_drops_the_oldest_turns_to_fit(tmp_path):
    folder = model_with_template(tmp_path, "qwen3", qwen_template("qwen3"))
    for url in _start(["--served-model-name", "m", "--max-model-len", "256"], model=folder):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        turns = []
        for i in range(12):
            turns += [{"role": "user", "content": f"Turn {i}: tell me about the lighthouse keeper and the sea."},
                      {"role": "assistant", "content": [{"type": "output_text",
                                                         "text": f"In turn {i} the keeper lit the lamp."}]}]
        ask = dict(model="m", instructions="Be brief.", max_output_tokens=4, temperature=0, store=False)
        conversation = turns + [{"role": "user", "content": "And then?"}]
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(input=conversation, **ask)
        assert e.value.body["code"] == "context_length_exceeded", e.value.body
        fitted = c.responses.create(input=conversation, truncation="auto", **ask)
        assert fitted.truncation == "auto"
        assert 0 < fitted.usage.input_tokens and fitted.usage.input_tokens + 4 <= 256, fitted.usage
        # Exactly the fewest oldest turns went: the instructions and the latest k exchanges as
        # they are give the same prompt and reply.
        for k in range(11, 0, -1):
            try:
                tail = c.responses.create(input=turns[-2 * k:] + conversation[-1:], **ask)
            except openai.BadRequestError:
                continue
            assert tail.usage.input_tokens == fitted.usage.input_tokens, (k, tail.usage, fitted.usage)
            assert tail.output_text == fitted.output_text
            break
        else:
            pytest.fail("no tail fits")
