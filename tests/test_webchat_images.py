"""The web chat page's image attachment, in headless Chromium against the live tiny server:
a chosen file goes as an `image_url` content part holding its bytes as a data: URL, the
text-only model's 400 is shown and the turn (text and image) comes back to retry, and an
image the server takes stays in the history the next turn sends."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from tests.test_server import ckpt, live  # noqa: F401 (fixtures)
from tests.test_webchat import CHROMIUM, browser, open_chat, page, say  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "box.png"
    img = Image.new("RGB", (24, 16), (255, 255, 255))
    img.paste((200, 30, 30), (4, 4, 16, 12))
    img.save(path)
    return path


def attach(page, path):
    assert not page.is_visible("#attachment")
    page.set_input_files("#image", str(path))
    page.wait_for_selector("#attachment:not([hidden])")
    assert page.inner_text("#attachment-name") == path.name


def test_an_image_is_sent_and_the_text_only_models_error_shown(live, page, png):  # noqa: F811
    sent = open_chat(page, live.url, max_tokens=4)
    attach(page, png)
    say(page, "What is this?")
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert sent[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]
    error = page.locator("#error")
    assert error.is_visible() and "Error 400" in error.text_content() and "reads text only" in error.text_content()
    assert page.locator(".msg.user.failed").count() == 1
    assert page.input_value("#input") == "What is this?" and page.is_visible("#attachment")  # back to retry

    page.click("#attachment-remove")
    assert not page.is_visible("#attachment")
    say(page, "Hello")
    assert not error.is_visible() and sent[1]["messages"] == [{"role": "user", "content": "Hello"}]


def test_an_image_the_server_takes_stays_in_the_history(live, page, png, monkeypatch):  # noqa: F811
    import nanoseek.serve.app as app_module
    # as a VL engine would take it: a placeholder id in the prompt, the text engine reading the ids alone
    monkeypatch.setattr(app_module, "engine_images", lambda *a: 5)
    monkeypatch.setattr(app_module, "engine_prompt", lambda llm, ids, images: (ids, len(ids)))
    sent = open_chat(page, live.url, max_tokens=4)
    attach(page, png)
    page.fill("#input", "")
    page.click("#send")  # an image alone may be sent
    page.wait_for_function("document.body.dataset.busy === ''")
    assert not page.is_visible("#error") and not page.is_visible("#attachment")
    assert page.locator(".msg.user .text img").count() == 1
    say(page, "And now?")
    first = sent[1]["messages"][0]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert sent[1]["messages"][2] == {"role": "user", "content": "And now?"}
