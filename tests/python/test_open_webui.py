"""Open WebUI's own requests (tests/data/open-webui: captured from Open WebUI 0.12.4 with its
default settings) against the bundled 512-token model, through the OpenAI and the Ollama API:
the chat with its 36 built-in tools (about 17,000 tokens on this model's tokenizer), the title
request that asks for 1,000 tokens, the follow-up and tag requests. Each gets an answer, not a
400: the conversation is fitted to the context as Ollama fits it, and the budget ends at the
context's end. With `--strict-context` the same chat is OpenAI's 400."""

import json
from pathlib import Path

import httpx
import pytest

from conftest import _start

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "open-webui"
CONTEXT = 512
# Open WebUI sends no temperature: seeded, the bundled model's sampled answers are the same each
# run (unseeded, one could end at its first token, an empty answer by chance).
SEED = 1


def captured(name, seed=None):
    """A captured body as bytes, addressed to the served model instead of the capture's, and
    seeded when `seed` is given (in the options of an Ollama body)."""
    body = json.loads((CAPTURES / name).read_bytes())
    body["model"] = "stories260k"
    if seed is not None and name.startswith("ollama_"):
        body["options"] = {**body.get("options", {}), "seed": seed}
    elif seed is not None:
        body["seed"] = seed
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def post(base, path, body):
    return httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=120)


def openai_answer(resp):
    """The text (or calls) and prompt tokens of a chat completion, streamed or not."""
    assert resp.status_code == 200, resp.text
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks
        deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
        text = "".join(d.get("content") or "" for d in deltas)
        calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]
        return text, calls, finish, None
    reply = resp.json()
    message = reply["choices"][0]["message"]
    return message.get("content") or "", message.get("tool_calls") or [], reply["choices"][0]["finish_reason"], reply["usage"]


def ollama_answer(resp):
    """The text (or calls) and `prompt_eval_count` of an /api/chat reply, streamed or not."""
    assert resp.status_code == 200, resp.text
    objects = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    assert not any("error" in o for o in objects), objects[-1]
    assert objects[-1]["done"] is True
    text = "".join(o["message"].get("content", "") for o in objects)
    calls = [c for o in objects for c in o["message"].get("tool_calls", [])]
    return text, calls, objects[-1]["done_reason"], objects[-1]["prompt_eval_count"]


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURES.glob("openai_*.json")))
def test_open_webui_s_openai_requests_get_answers(server_url, name):
    text, calls, finish, usage = openai_answer(post(server_url, "/v1/chat/completions", captured(name, seed=SEED)))
    assert text or calls, name
    assert finish in ("stop", "length", "tool_calls"), finish
    if usage is not None:
        assert 0 < usage["prompt_tokens"] < CONTEXT and usage["total_tokens"] <= CONTEXT, usage


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURES.glob("ollama_*.json")))
def test_open_webui_s_ollama_requests_get_answers(server_url, name):
    text, calls, finish, evaluated = ollama_answer(post(server_url, "/api/chat", captured(name, seed=SEED)))
    assert text or calls, name
    assert finish in ("stop", "length"), finish
    assert 0 < evaluated < CONTEXT


def test_the_title_request_s_budget_ends_at_the_context(server_url):
    body = json.loads(captured("openai_newchat_admin_01_title.json"))
    assert body["max_tokens"] == 1000 and body["stream"] is False
    body["temperature"], body["ignore_eos"] = 0, True
    _, _, finish, usage = openai_answer(post(server_url, "/v1/chat/completions", json.dumps(body).encode()))
    assert finish == "length" and usage["total_tokens"] == CONTEXT, usage
    # Its prompt alone does not fit: its middle was cut, leaving the reply a quarter.
    assert usage["completion_tokens"] == CONTEXT // 4, usage


def test_strict_context_keeps_openai_s_400():
    for url in _start(["--strict-context"]):
        resp = post(url, "/v1/chat/completions", captured("openai_newchat_admin_02_chat.json"))
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
