"""The prefix cache survives a restart (`--kv-disk`): prime a long prompt, stop the server,
start it again on the same directory, and the same request finds its prefix on disk
(`cached_tokens`) and answers the same, through the official `openai` package."""

import urllib.request

import openai

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
