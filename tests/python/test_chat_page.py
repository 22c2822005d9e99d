"""The chat page at `/`, in a real browser: Debian's Chromium driven headless by Playwright
(no browser download), against a live `mlxd serve` of the bundled model and a thinking model
(the Qwen3 fixture with the Qwen3.5 template, whose reply is a thought). It sends a message and
sees it stream, regenerates, stops a long reply (the server frees it), switches model, expands a
thought, finds the conversations after a reload, shows imported hostile markup as text, asks
for an API key, and fits a phone's screen. A screenshot of each state goes to
target/ui-screenshots (MLXD_UI_SHOTS overrides)."""

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, _start
from test_anthropic_client import qwen_template
from test_tools_reasoning import model_with_template

SHOTS = Path(os.environ.get("MLXD_UI_SHOTS", ROOT / "target" / "ui-screenshots"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("page-models")
    model_with_template(models, "qwen3", qwen_template("qwen3.5"))
    yield from _start(["--models-dir", str(models)])


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "the chat page test needs Debian's chromium (apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def pages(browser):
    """Opens a test's pages and closes them when it ends, failed or not: a failed test's page
    that still streams a reply must not slow the next test's."""
    opened = []

    def open_page(**options):
        page = browser.new_page(**options)
        opened.append(page)
        return page

    yield open_page
    for page in opened:
        page.close()


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def running(url, model):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    found = re.search(rf'^mlxd_num_requests_running\{{model="{model}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_person_chats_stops_switches_models_and_comes_back(server, pages):
    page = pages(viewport={"width": 1200, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    model = page.locator("#model")
    expect(model.locator("option")).to_have_count(2)
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#stop")).to_be_hidden()
    shot(page, "1-opened")

    # A message streams in, with its stats; a regenerated reply reads the prompt from the cache.
    model.select_option("stories260k")
    page.click("#settings-toggle")
    page.fill("#max_tokens", "40")
    page.dispatch_event("#max_tokens", "change")
    page.fill("#input", "Once upon a time there was a little cat who lived in a big house near the woods.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("tok/s", timeout=20_000)
    assert reply.locator("p").first.inner_text().strip(), "the reply has text"
    tokens = int(re.search(r"(\d+) tokens", reply.locator(".meta").inner_text()).group(1))
    assert 0 < tokens <= 40, "the conversation's max tokens held"
    expect(model.locator("option[value='stories260k']")).to_have_text("● stories260k")
    expect(model.locator("option[value='qwen3']")).to_have_text("○ qwen3")
    shot(page, "2-replied")
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text(re.compile(r"[1-9]\d* cached"), timeout=20_000)
    assert page.locator(".msg.assistant").count() == 1, "the regenerated reply replaced the old one"
    # Edit and resend: the message comes back to the composer and the conversation is cut there.
    page.locator(".msg.user").last.get_by_role("button", name="Edit").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#input")).to_have_value(re.compile("^Once upon a time there was a little cat"))
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text("tok/s", timeout=20_000)
    expect(page.locator(".msg")).to_have_count(2)
    # The other theme.
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") in ("dark", "light")
    shot(page, "2b-other-theme")

    # Another conversation on the thinking model: a long reply is stopped with Esc and the
    # server frees its sequence at once.
    page.click("#new-chat")
    model.select_option("qwen3")
    page.fill("#max_tokens", "")
    page.dispatch_event("#max_tokens", "change")
    # Greedy, so the random model's reply is the one this test knows to run long (sampled, it
    # sometimes ended before Stop could be seen).
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#input", "Why is the sky blue?")
    page.press("#input", "Enter")
    thought = page.locator(".msg.assistant").last.locator(".thought")
    expect(thought).to_be_attached(timeout=20_000)
    expect(page.locator("#stop")).to_be_visible()
    # It streams: the reply (its thought, or its text once the random model closes the thought)
    # grows while it runs.
    seen = len(page.locator(".msg.assistant").last.text_content())
    page.wait_for_function("n => document.querySelector('.msg.assistant:last-child').textContent.length > n",
                           arg=seen, timeout=10_000)
    assert running(server, "qwen3") == 1.0
    page.keyboard.press("Escape")
    expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text("stopped")
    deadline = time.time() + 10
    while running(server, "qwen3") != 0.0:
        assert time.time() < deadline, "the stopped reply still runs on the server"
        time.sleep(0.05)
    shot(page, "3-stopped")

    # The thought is collapsed until opened.
    details = page.locator(".msg.assistant .thought").last
    assert details.get_attribute("open") is None
    details.locator("summary").click()
    expect(details).to_have_attribute("open", "")
    assert details.locator("div").inner_text().strip()
    shot(page, "4-thought-open")

    # After a reload both conversations are there, each with its messages and model.
    page.reload()
    titles = page.locator("#chat-list .title")
    expect(titles).to_have_count(2)
    titles.nth(1).click()
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(model).to_have_value("stories260k")
    shot(page, "5-reloaded")
    assert not errors, errors


def test_hostile_markup_in_a_reply_shows_as_text(server, pages, tmp_path):
    page = pages()
    page.goto(server)
    hostile = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **bold** `code`'
    chat = {"id": "imported-1", "title": "Imported", "model": "stories260k", "system": "", "temperature": 0.7,
            "top_p": 1, "max_tokens": None,
            "messages": [{"role": "user", "content": "<b>hi</b>"},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "<i>Paris</i>"}'}]},
                         {"role": "user", "content": "and?"},
                         {"role": "assistant", "content": hostile}]}
    exported = tmp_path / "chats.json"
    exported.write_text(json.dumps([chat]))
    page.set_input_files("#import", str(exported))
    reply = page.locator(".msg.assistant").last
    expect(reply).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(reply).to_contain_text("<script>window.__xss=2</script>")
    assert reply.locator("img, script").count() == 0
    assert reply.locator("strong").inner_text() == "bold" and reply.locator("code").inner_text() == "code"
    expect(page.locator(".msg.user").first).to_have_text(re.compile(r"^<b>hi</b>"))
    expect(page.locator(".tool-call")).to_have_text('⚙ get_weather({"city": "<i>Paris</i>"})')
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None
    shot(page, "6-hostile-markup-as-text")


def test_the_page_asks_for_a_key_and_fits_a_phone(pages):
    for url in _start(["--api-key", "page-key"]):
        page = pages(viewport={"width": 390, "height": 844})
        page.goto(url)
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "page-key")
        page.click("#key-dialog button")
        expect(page.locator("#model option")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('mlxd.key')") == "page-key"
        assert page.evaluate("localStorage.getItem('mlxd.key')") is None
        # On a phone the conversation list is a drawer; the composer fits the width.
        assert page.locator("#composer").bounding_box()["width"] <= 390
        shot(page, "7-phone-with-key")
        expect(page.locator("#new-chat")).not_to_be_in_viewport()
        page.click("#toggle-sidebar")
        expect(page.locator("#new-chat")).to_be_in_viewport(ratio=1)
        page.wait_for_timeout(300)  # the drawer's slide
        shot(page, "8-phone-conversations")
