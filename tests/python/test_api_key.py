"""Both official clients against a server that requires an API key."""

import ollama
import openai
import pytest

from conftest import API_KEY


def test_openai_client_sends_its_key(keyed_server_url):
    client = openai.OpenAI(base_url=keyed_server_url + "/v1", api_key=API_KEY)
    reply = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4


def test_openai_client_with_a_wrong_key_gets_401(keyed_server_url):
    client = openai.OpenAI(base_url=keyed_server_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401


def test_ollama_client_sends_its_key_through_headers(keyed_server_url):
    client = ollama.Client(host=keyed_server_url, headers={"Authorization": f"Bearer {API_KEY}"})
    reply = client.generate(model="stories260k", prompt="Once upon a time", raw=True,
                            options={"num_predict": 4, "temperature": 0})
    assert reply.eval_count == 4


def test_ollama_client_without_a_key_gets_401(keyed_server_url):
    client = ollama.Client(host=keyed_server_url)
    with pytest.raises(ollama.ResponseError) as err:
        client.list()
    assert err.value.status_code == 401


def test_anthropic_client_sends_its_key_as_x_api_key(keyed_server_url):
    import anthropic
    client = anthropic.Anthropic(base_url=keyed_server_url, api_key=API_KEY)
    reply = client.messages.create(model="stories260k", max_tokens=4,
                                   messages=[{"role": "user", "content": "Once upon a time"}])
    assert reply.usage.output_tokens == 4


def test_anthropic_client_with_a_wrong_key_gets_its_own_401(keyed_server_url):
    import anthropic
    client = anthropic.Anthropic(base_url=keyed_server_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(model="stories260k", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 401
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
