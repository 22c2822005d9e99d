"""Images through the official clients to the tiny Gemma 3 vision model of
tests/data/gemma3_vision (make_fixtures.py): the OpenAI SDK's `image_url` data URL, the `ollama`
package's `images` (it reads the file and base64-encodes it), the Anthropic SDK's base64 image
block. Each answers transformers' greedy continuation of the same conversation (an image, then
"Describe this picture."), and each SDK surfaces a bad image as its own 400 error."""

import base64
import json

import anthropic
import ollama
import openai
import pytest

from conftest import ROOT, _start

DATA = ROOT / "tests" / "data" / "gemma3_vision"
REFS = json.loads((DATA / "refs" / "transformers-f32.json").read_text())
IMAGE = DATA / "images" / "square64.png"
TEXT = "Describe this picture."


@pytest.fixture(scope="module")
def vision_url():
    yield from _start(["--served-model-name", "gemma3-vision"], model=DATA / "f32")


@pytest.fixture(scope="module")
def expected(vision_url):
    """The first reference conversation's reply: transformers' greedy ids (checked through the
    token ids chat completions report), as the server's text."""
    one = REFS["sequences"][0]
    assert one["name"] == "one_image" and one["messages"][0]["content"][1]["text"] == TEXT
    client = openai.OpenAI(base_url=vision_url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model="gemma3-vision", max_tokens=8, temperature=0, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                               {"type": "text", "text": TEXT}]}])
    assert [int(t.token.split(":")[1]) for t in r.choices[0].logprobs.content] == one["greedy"]
    return r.choices[0].message.content


def data_url():
    return "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()


def test_openai_sdk_image_url(vision_url, expected):
    """The plain SDK call (no logprobs) gives the same text."""
    client = openai.OpenAI(base_url=vision_url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model="gemma3-vision",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url()}},
            {"type": "text", "text": TEXT},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(REFS["sequences"][0]["input_ids"])


def test_ollama_package_images(vision_url, expected):
    client = ollama.Client(host=vision_url)
    r = client.chat(
        model="gemma3-vision",
        messages=[{"role": "user", "content": TEXT, "images": [str(IMAGE)]}],
        options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8},
    )
    assert r.message.content == expected
    g = client.generate(model="gemma3-vision", prompt=TEXT, images=[IMAGE.read_bytes()],
                        options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8})
    assert g.response == expected


def test_anthropic_sdk_image_block(vision_url, expected):
    client = anthropic.Anthropic(base_url=vision_url, api_key="unused")
    r = client.messages.create(
        model="gemma3-vision",
        max_tokens=8,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(IMAGE.read_bytes()).decode()}},
            {"type": "text", "text": TEXT},
        ]}],
    )
    assert r.content[0].text == expected


def test_each_sdk_sees_a_bad_image_as_a_400(vision_url):
    garbage = base64.b64encode(b"these bytes are no picture").decode()
    oa = openai.OpenAI(base_url=vision_url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="image 1 is not a PNG"):
        oa.chat.completions.create(model="gemma3-vision", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + garbage}},
            {"type": "text", "text": "hi"}]}])
    with pytest.raises(ollama.ResponseError, match="image 1 is not a PNG") as e:
        ollama.Client(host=vision_url).chat(model="gemma3-vision", messages=[
            {"role": "user", "content": "hi", "images": [garbage]}])
    assert e.value.status_code == 400
    with pytest.raises(anthropic.BadRequestError, match="image 1 is not a PNG"):
        anthropic.Anthropic(base_url=vision_url, api_key="unused").messages.create(
            model="gemma3-vision", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": garbage}},
                {"type": "text", "text": "hi"}]}])


def test_an_ollama_store_model_with_a_projector_layer_takes_images(tmp_path):
    """A manifest whose layers carry the mmproj file (`application/vnd.ollama.image.projector`)
    beside the model, as `ollama pull gemma3` stores it: the model takes images. The same
    model without the layer is text-only and says so."""
    import hashlib

    store = tmp_path / "ollama"

    def blob(path):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (store / "blobs").mkdir(parents=True, exist_ok=True)
        (store / "blobs" / f"sha256-{digest}").write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    def manifest(tag, layers):
        path = store / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))

    model = {"mediaType": "application/vnd.ollama.image.model", **blob(DATA / "gguf" / "text-f32.gguf")}
    projector = {"mediaType": "application/vnd.ollama.image.projector", **blob(DATA / "gguf" / "mmproj-f32.gguf")}
    manifest("tiny", [model, projector])
    manifest("tiny-text", [model])
    for url in _start(["--ollama-models", str(store)], model="gemma3:tiny"):
        client = ollama.Client(host=url)
        ask = [{"role": "user", "content": TEXT, "images": [str(IMAGE)]}]
        r = client.chat(model="gemma3:tiny", messages=ask, options={"temperature": 0, "num_predict": 4})
        assert r.done and r.eval_count == 4 and r.prompt_eval_count > 4
        with pytest.raises(ollama.ResponseError, match="model `gemma3:tiny-text` has no vision input"):
            client.chat(model="gemma3:tiny-text", messages=ask)


def test_an_image_url_is_fetched_only_with_allow_image_urls(vision_url, expected):
    """The OpenAI SDK's `image_url` with an http URL (a loopback image server): refused unless
    the server runs with `--allow-image-urls`; with it and the host named, the fetched image
    gives the data URL's answer; with it and no host named, loopback is refused as not public."""
    import http.server
    import threading

    class Image(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = IMAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Image)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}/cat.png"

    def ask(base):
        return openai.OpenAI(base_url=base + "/v1", api_key="unused").chat.completions.create(
            model="gemma3-vision", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": TEXT}]}])

    try:
        with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
            ask(vision_url)
        served = ["--served-model-name", "gemma3-vision"]
        for base in _start([*served, "--allow-image-urls", "127.0.0.1"], model=DATA / "f32"):
            assert ask(base).choices[0].message.content == expected
        for base in _start([*served, "--allow-image-urls"], model=DATA / "f32"):
            with pytest.raises(openai.BadRequestError, match="not a public address"):
                ask(base)
    finally:
        host.shutdown()
