"""Tool calling and thinking through the official `openai` and `ollama` packages, on the tiny
random-weight fixtures of each family served with that family's real chat template
(`../shared/tokenizers`): Qwen2.5 and Qwen3 (`<tool_call>`), Llama 3.2 (JSON with
`parameters`, `<|python_tag|>` a special token), Mistral Nemo (`[TOOL_CALLS]`, a special
token), Gemma 4 (`<|tool_call>call:name{…}<tool_call|>` in its own value syntax), gpt-oss
(harmony: a commentary message `to=functions.NAME`, its tokens special), and Gemma 3
and Phi-3.5, whose templates know no tools (mlxd describes them itself).

A random model never calls a tool of its own accord, so calls are forced with `tool_choice`
(constrained decoding in the family's syntax, then parsed back like any reply); the round trip
then sends the call and its result back through the template. Thoughts are steered with
`logit_bias` on the think tags, and the split is checked against a reference split of the raw
completion of the same prompt."""

import json
import uuid
import re
import urllib.request
from pathlib import Path

import jsonschema
import ollama
import openai
import pytest

from conftest import ROOT, _start

SHARED = ROOT.parent / "shared"

#: fixture architecture -> the family's real chat template
FAMILIES = {
    "qwen2": ("tokenizers/qwen2.5/tokenizer_config.json", None),
    "qwen3": ("tokenizers/qwen3/tokenizer_config.json", None),
    "llama": ("tokenizers/llama3.2/tokenizer_config.json", None),
    "mistral": ("tokenizers/mistral-nemo/tokenizer_config.json", None),
    "gemma3": ("tokenizers/gemma3/tokenizer_config.json", None),
    "phi3": (None, "tokenizers/chat_templates/microsoft-Phi-3.5-mini-instruct.jinja"),
    "gemma4": (None, ROOT / "tests/data/gemma4/chat_template.jinja"),
    "gpt_oss": (None, "tokenizers/chat_templates/openai-gpt-oss-120b.jinja"),
}
#: fixtures that are not in ../shared/fixtures
FIXTURES = {"gemma4": ROOT / "tests/data/gemma4/dense/f32", "gpt_oss": ROOT / "tests/data/gpt_oss/f32"}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def model_with_template(tmp: Path, arch: str, template: str) -> Path:
    """The fixture `arch` (f32) with `template` as its chat_template.jinja."""
    folder = tmp / arch
    folder.mkdir()
    for f in FIXTURES.get(arch, SHARED / "fixtures" / arch / "f32").iterdir():
        if f.name == "chat_template.jinja":
            continue
        (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def family_template(arch: str) -> str:
    config, jinja = FAMILIES[arch]
    if jinja:
        return (SHARED / jinja).read_text()
    return json.loads((SHARED / config).read_text())["chat_template"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    arch = request.param
    folder = model_with_template(tmp_path_factory.mktemp("models"), arch, family_template(arch))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield arch, url


def check_calls(calls, allowed=SCHEMAS):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function"
        assert call.function.name in allowed, call.function.name
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def streamed_calls(stream):
    """Tool calls rebuilt from stream deltas as a client does: by index, id/name first, then
    argument text appended."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    call["arguments"] += piece.function.arguments
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_a_required_call_round_trips_through_the_family_template(family):
    arch, url = family
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed, temperature in [(1, 0.0), (2, 0.8), (3, 1.2)]:
        r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required",
                                           temperature=temperature, seed=seed, max_tokens=80)
        choice = r.choices[0]
        check_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls", arch
        assert choice.message.content is None
    # The call and its result go back through the template; the next turn is answered.
    call = choice.message.tool_calls[0]
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})},
    ]
    # (One tool: the Llama fixture's 1,024-token context is nearly full with both.)
    tools = [t for t in TOOLS if t["function"]["name"] == call.function.name]
    r = client.chat.completions.create(model="m", messages=history, tools=tools, temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 0


def test_streamed_calls_equal_whole_ones(family):
    arch, url = family
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Time in zone 3?"}], tools=TOOLS,
                  tool_choice="required", temperature=0.9, seed=7, max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish, content = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert finish == whole.finish_reason == "tool_calls"
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"] for c in calls)


def test_string_formats_hold_in_forced_calls(family):
    """A forced call's string `format`s are enforced in every family's syntax (llguidance's JSON
    rules, Gemma 4's own grammar), even at a high temperature."""
    arch, url = family
    book = {"type": "object", "additionalProperties": False, "required": ["day", "ref"],
            "properties": {"day": {"type": "string", "format": "date"}, "ref": {"type": "string", "format": "uuid"}}}
    tools = [{"type": "function", "function": {"name": "book", "description": "Book a day", "parameters": book}}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Book it"}], tools=tools,
                                           tool_choice="required", temperature=1.2, seed=seed, max_tokens=120)
        args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", args["day"]), (arch, args)
        assert str(uuid.UUID(args["ref"])) == args["ref"].lower(), (arch, args)


def test_a_tool_without_a_description_is_offered(family):
    """`description` is optional in the API; gpt-oss's template writes it unconditionally."""
    arch, url = family
    bare = [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Time?"}], tools=bare,
                                       tool_choice="required", max_tokens=80, temperature=0)
    check_calls(r.choices[0].message.tool_calls, {"get_time": TIME})


def test_a_named_function_is_the_one_called(family):
    arch, url = family
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], tools=TOOLS, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
        max_tokens=80)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    check_calls(calls, {"get_time": TIME})


def test_tool_choice_none_and_bad_tools_are_refused_or_plain(family):
    arch, url = family
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    for bad, field in [({"tools": [{"type": "code"}]}, "tools"),
                       ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                       ({"tool_choice": "required"}, "tool_choice"),
                       ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                           **bad)
        assert e.value.body["param"] == field, (bad, e.value.body)


def test_ollama_tool_calls_come_back_with_object_arguments(family):
    """Ollama has no tool_choice; a `format` schema for the call forces it on the families
    whose calls are a bare JSON object (Llama 3, and templates without tool support)."""
    arch, url = family
    client = ollama.Client(host=url)
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
                   "required": ["name", "arguments"], "additionalProperties": False}
    if arch in ("llama", "gemma3", "phi3"):
        r = client.chat(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                        format=call_schema, options={"temperature": 0, "num_predict": 80})
        calls = r.message.tool_calls
        assert calls and calls[0].function.name == "get_weather", r
        jsonschema.validate(dict(calls[0].function.arguments), WEATHER)
        assert r.message.content == ""
    # A conversation with an earlier call and its result renders, whatever the family.
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "18", "tool_name": "get_weather"},
    ]
    r = client.chat(model="m", messages=history, tools=TOOLS, options={"temperature": 0, "num_predict": 4})
    assert r.done_reason in ("stop", "length")


# --- thinking ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = model_with_template(tmp_path_factory.mktemp("think"), "qwen3", family_template("qwen3"))
    for url in _start(["--served-model-name", "m"], model=folder):
        yield folder, url


def reference_split(raw: str):
    """The thought split rule, written independently: a reply that opens with <think> thinks
    until </think>; blanks around the thought are not part of either side."""
    text = raw.lstrip()
    if not text.startswith("<think>"):
        return "", raw
    thought, sep, answer = text[len("<think>"):].partition("</think>")
    return thought.lstrip(), answer.lstrip() if sep else ""


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.loads(r.read())


def token_id(folder: Path, text: str) -> int:
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return next(t["id"] for t in added if t["content"] == text)


def test_a_thought_is_split_from_the_answer_streamed_or_not(qwen3):
    folder, url = qwen3
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    open_id, close_id = token_id(folder, "<think>"), token_id(folder, "</think>")
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    seen_both = 0
    for bias_close in (3, 4, 5, 6):
        # The open tag wins the first step; penalties let the text move on, and the close tag
        # comes back later.
        sampling = dict(temperature=0, max_tokens=40, frequency_penalty=2.0,
                        logit_bias={str(open_id): 8, str(close_id): bias_close})
        ids = post(url + "/tokenize", {"messages": messages})["tokens"]
        raw = client.completions.create(model="m", prompt=ids, **sampling).choices[0].text
        want_reasoning, want_content = reference_split(raw)
        whole = client.chat.completions.create(model="m", messages=messages, **sampling).choices[0].message
        assert (whole.model_extra.get("reasoning_content") or "", whole.content or "") == (want_reasoning, want_content), raw
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(model="m", messages=messages, stream=True, **sampling):
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                content += choice.delta.content or ""
        assert (reasoning, content) == (want_reasoning, want_content)
        seen_both += bool(want_reasoning and want_content)
        # include_reasoning: false drops the thought, the answer stays.
        dropped = client.chat.completions.create(model="m", messages=messages, extra_body={"include_reasoning": False},
                                                 **sampling).choices[0].message
        assert (dropped.model_extra.get("reasoning_content"), dropped.content or "") == (None, want_content)
    assert seen_both, "no case had both a thought and an answer: the test steers nothing"


def test_template_kwargs_reach_the_template(qwen3):
    _, url = qwen3
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hi"}]
    on = client.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0)
    off = client.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # Qwen3's template closes an empty thought in the prompt when thinking is off.
    assert off.usage.prompt_tokens > on.usage.prompt_tokens


@pytest.fixture(scope="module")
def opening_thought(tmp_path_factory):
    """Qwen3 with DeepSeek-R1's template, whose generation prompt opens a thought unless
    `enable_thinking` is false."""
    template = (SHARED / "tokenizers/chat_templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    folder = model_with_template(tmp_path_factory.mktemp("r1"), "qwen3", template)
    for url in _start(["--served-model-name", "m"], model=folder):
        yield url


def test_ollama_think_gives_thinking(opening_thought):
    client = ollama.Client(host=opening_thought)
    opts = {"temperature": 0, "num_predict": 12}
    r = client.chat(model="m", messages=[{"role": "user", "content": "Hi"}], think=True, options=opts)
    assert r.message.thinking and r.message.content == "", r
    streamed = "".join(part.message.thinking or "" for part in
                       client.chat(model="m", messages=[{"role": "user", "content": "Hi"}], think=True,
                                   options=opts, stream=True))
    assert streamed == r.message.thinking
    g = client.generate(model="m", prompt="Hi", think=True, options=opts)
    assert g.thinking == r.message.thinking and g.response == ""
    off = client.chat(model="m", messages=[{"role": "user", "content": "Hi"}], think=False, options=opts)
    assert not off.message.thinking and off.message.content
    show = client.show("m")
    assert "thinking" in show.capabilities and "tools" in show.capabilities


def test_reasoning_format_inline_keeps_the_thought_in_the_content(tmp_path_factory):
    template = (SHARED / "tokenizers/chat_templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    folder = model_with_template(tmp_path_factory.mktemp("inline"), "qwen3", template)
    for url in _start(["--served-model-name", "m", "--reasoning-format", "inline"], model=folder):
        r = ollama.Client(host=url).chat(model="m", messages=[{"role": "user", "content": "Hi"}], think=True,
                                         options={"temperature": 0, "num_predict": 8})
        assert not r.message.thinking
        assert r.message.content.startswith("<think>"), r.message.content
