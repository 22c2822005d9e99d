"""The prefix cache survives a restart (`--kv-disk`): prime a long prompt, stop the server,
start it again on the same directory, and the same request finds its prefix on disk
(`cached_tokens`) and answers the same, through the official `openai` package."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import _start

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
          "with her friends and her dog. ") * 12


def ask(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=12, temperature=0)
    return r.choices[0].text, r.usage


def test_a_restart_finds_the_prefix_on_disk(tmp_path):
    disk = ["--kv-disk", str(tmp_path / "kv")]
    for url in _start(disk):
        cold_text, cold = ask(url)
        assert cold.prompt_tokens_details.cached_tokens == 0
    for url in _start(disk):
        warm_text, warm = ask(url)
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert warm_text == cold_text
    full_blocks = (cold.prompt_tokens - 1) // 16 * 16
    assert warm.prompt_tokens_details.cached_tokens >= 0.9 * full_blocks, (warm, cold.prompt_tokens)
    assert 'mlxd_kv_disk_hits_total{model="stories260k"}' in metrics
    # Without the directory, nothing is remembered.
    for url in _start([]):
        assert ask(url)[1].prompt_tokens_details.cached_tokens == 0


def post(url, path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.loads(r.read())


def test_a_pinned_conversation_outlives_the_budget_and_a_restart(tmp_path):
    """A small disk budget: a pinned prefix stays while other prompts push everything else out,
    and comes back after a restart; unpinned, it ages out like the rest."""
    disk = ["--kv-disk", str(tmp_path / "kv"), "--kv-disk-size", "1MiB"]
    messages = [{"role": "user", "content": PROMPT}]
    for url in _start(disk):
        pinned = post(url, "/v1/kv/pin", {"messages": messages})
        assert pinned["blocks"] >= 5 and pinned["tokens"] == 16 * pinned["blocks"], pinned
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for i in range(12):  # other prompts: far more blocks than the budget holds
            client.completions.create(model="stories260k", prompt=f"{i} " + PROMPT, max_tokens=1)
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        assert 'mlxd_kv_disk_evictions_total{model="stories260k"} 0' not in metrics, "the budget evicted nothing"
    for url in _start(disk):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        r = client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens >= 0.9 * pinned["tokens"], (r.usage, pinned)
        unpinned = post(url, "/v1/kv/unpin", {"messages": messages})
        assert unpinned["blocks"] == pinned["blocks"]
    for url in _start([]):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(url, "/v1/kv/pin", {"prompt": "Once upon a time"})
        assert e.value.code == 400 and "kv-disk" in e.value.read().decode()
