"""The web chat page (nanoseek/serve/static/), driven in headless Chromium by Playwright
against a live server with the tiny model of test_server.py: an answer streams in (seen
growing while the engine is held), the history and system prompt go with each turn, Stop
aborts the engine request, New chat forgets, and every kind of failure is shown in the
page — a 400 from the server, a dropped connection, an SSE error event, a wrong API key.

Uses Debian's chromium (NANOSEEK_CHROMIUM overrides /usr/bin/chromium); Playwright never
downloads a browser. `python -m tests.test_webchat docs/chat.png [CHECKPOINT]` takes the
README's screenshot with the same setup."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.test_server import KEY, MODEL, Gate, Live, ckpt, live, make_app, strict, wait_for  # noqa: F401

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="the web chat test needs Python's playwright")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                 reason=f"no chromium at {CHROMIUM} (set NANOSEEK_CHROMIUM)")]
IDLE = "document.body.dataset.busy === ''"


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


def open_chat(page, url, max_tokens: int | None = 12, temperature: float = 0.0):
    """The page, its model list loaded, greedy sampling; returns the chat request bodies it will send."""
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)
    page.wait_for_selector("#model option", state="attached")
    page.eval_on_selector("#temperature", "(el, t) => { el.value = t; el.dispatchEvent(new Event('input')); }",
                          temperature)
    page.fill("#max-tokens", "" if max_tokens is None else str(max_tokens))
    return sent


def say(page, text: str, wait: bool = True):
    page.fill("#input", text)
    page.press("#input", "Enter")
    if wait:
        page.wait_for_function(IDLE)


def answers(page) -> list[str]:
    return page.locator(".msg.assistant .text").all_inner_texts()


def test_an_answer_streams_in_and_the_history_goes_with_each_turn(live, page):
    sent = open_chat(page, live.url)
    assert page.input_value("#model") == MODEL and "256" in page.inner_text("#model-info")
    bubble = page.locator(".msg.assistant").last
    with Gate(live.engine) as gate:  # the engine steps only when allowed: the stream is surely unfinished
        say(page, "Hello there", wait=False)
        gate.allow(2)
        page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
        early = bubble.locator(".text").text_content()
        assert page.evaluate("document.body.dataset.busy") == "1" and page.is_enabled("#stop")
    page.wait_for_function(IDLE)
    final = bubble.locator(".text").text_content()
    assert final.startswith(early) and len(final) > len(early)  # it grew: two observations of one stream
    assert int(bubble.get_attribute("data-chunks")) >= 2
    whole = live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                                  max_tokens=12, temperature=0)
    assert final == whole.choices[0].message.content  # every SSE chunk arrived, in order
    assert "12 tokens" in bubble.locator(".meta").text_content()
    assert sent[0]["stream"] is True and sent[0]["max_tokens"] == 12 and sent[0]["temperature"] == 0

    page.fill("#system", "Be brief.")
    say(page, "And again?")  # Enter sends
    assert sent[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"},
                                   {"role": "assistant", "content": final},
                                   {"role": "user", "content": "And again?"}]
    assert len(answers(page)) == 2 and page.locator(".msg.user").all_inner_texts()[1].endswith("And again?")

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "line two")
    page.click("#send")
    page.wait_for_function(IDLE)
    assert sent[2]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "line one\nline two"}]


def test_stop_aborts_the_engine_request(live, page):
    sent = open_chat(page, live.url, max_tokens=200)
    generated = lambda: live.metrics().get(("nanoseek_generation_tokens_total", ()), 0)  # noqa: E731
    before = generated()
    with Gate(live.engine) as gate:
        say(page, "Tell me everything", wait=False)
        gate.allow(3)
        page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
        page.click("#stop")
        page.wait_for_function(IDLE)
        wait_for(lambda: not live.engine.requests and live.app.state.admission.in_flight == 0, "the abort")
    partial = answers(page)[0]
    assert page.locator(".msg.assistant .meta").text_content() == "stopped"
    assert generated() - before < 20  # of 200: the request was cut, not finished
    say(page, "go on")
    assert sent[1]["messages"][1] == {"role": "assistant", "content": partial}  # the partial answer is kept


def test_failures_are_shown_and_leave_the_history(live, page):
    sent = open_chat(page, live.url, max_tokens=250)  # prompt + 250 > the context of 256
    say(page, "Too long")
    error = page.locator("#error")
    assert error.is_visible() and "Error 400" in error.text_content() and "256" in error.text_content()
    assert page.locator(".msg.user.failed").count() == 1 and page.input_value("#input") == "Too long"

    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.fill("#max-tokens", "4")
    say(page, "Anyone there?")
    assert "Network error" in error.text_content()
    page.unroute("**/v1/chat/completions")

    chunk = {"choices": [{"index": 0, "delta": {"content": "<b>half</b> an ans"}, "finish_reason": None}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'error': {'message': 'the engine failed'}})}\n\ndata: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    say(page, "Then fail")
    assert error.text_content() == "Error: the engine failed" and "<b>half</b> an ans" in answers(page)
    assert page.locator(".msg b").count() == 0  # model output is text, never markup
    page.unroute("**/v1/chat/completions")

    say(page, "Hello")
    assert not error.is_visible() and page.locator(".msg.assistant:not(.failed)").count() == 1
    assert sent[-1]["messages"] == [{"role": "user", "content": "Hello"}]  # no failed turn was kept


def test_api_key_is_asked_for_sent_and_remembered(strict, page):
    page.goto(strict.url)
    error = page.locator("#error")
    page.wait_for_function("!document.getElementById('error').hidden")
    assert "no API key given" in error.text_content() and page.locator("#model option").count() == 0
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Tab")  # change: stored, models reloaded
    page.wait_for_function("document.getElementById('error').textContent.includes('not valid')")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#model option", state="attached")
    assert not error.is_visible()
    with page.expect_request("**/v1/chat/completions") as request:
        say(page, "Hi")
    assert request.value.headers["authorization"] == f"Bearer {KEY}" and answers(page)[0]
    page.reload()
    assert page.input_value("#api-key") == KEY
    page.wait_for_selector("#model option", state="attached")


# ----------------------------------------------------------------- the README's screenshot
def screenshot(out: Path, checkpoint: Path | None) -> None:
    """A 1280x800 PNG of the page after a short exchange (the model: `checkpoint`, else the
    tests' tiny random one)."""
    import tempfile

    from tests.test_server import tiny_checkpoint
    server = Live(make_app(checkpoint or tiny_checkpoint(Path(tempfile.mkdtemp()))))
    try:
        with playwright.sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1280, "height": 800})
            open_chat(page, server.url, max_tokens=48, temperature=0.7)
            page.fill("#system", "You are a concise assistant that explains Python.")
            say(page, "What does a for statement do?")
            say(page, "And what about the with statement?")
            page.screenshot(path=str(out))
            b.close()
    finally:
        server.stop()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
