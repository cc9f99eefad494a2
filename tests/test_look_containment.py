"""The look tool's image stays with the loopback endpoint the user named: a 307 from that
endpoint is not followed to another host, and an HTTP(S)_PROXY in the environment does not
carry the request off the machine."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from nanoseek.agent.images import read_images
from nanoseek.agent.tools.base import ToolError
from nanoseek.agent.tools.vision import look_tool

COMPLETION = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "a red square"}}]}


class Endpoint:
    """A stdlib HTTP server on 127.0.0.1 that records each request and answers a completion,
    or with `redirect` a 307 to that URL."""

    def __init__(self, redirect: str | None = None):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                hits.append((self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                if redirect:
                    self.send_response(307)
                    self.send_header("Location", redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(COMPLETION).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST  # a proxy sees absolute-form requests of any method

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "red.png")
    return read_images([str(tmp_path / "red.png")])


def test_look_does_not_follow_a_redirect_off_the_endpoint(images):
    elsewhere = Endpoint()
    loop = Endpoint(redirect=elsewhere.url + "/v1/chat/completions")
    try:
        look = look_tool(images, loop.url + "/v1", "m", timeout_s=5).fn
        with pytest.raises(ToolError, match="vision endpoint failed"):
            look(image=0, question="What is it?")
        assert len(loop.hits) == 1 and elsewhere.hits == []  # the image went nowhere else
    finally:
        loop.stop()
        elsewhere.stop()


def test_look_ignores_a_proxy_from_the_environment(images, monkeypatch):
    proxy, endpoint = Endpoint(), Endpoint()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        got = look_tool(images, endpoint.url + "/v1", "m", timeout_s=5).fn(image=0, question="What is it?")
        assert got == "image 0 (red.png): a red square"
        assert proxy.hits == [] and len(endpoint.hits) == 1
        assert b"data:image/png;base64," in endpoint.hits[0][1]
    finally:
        proxy.stop()
        endpoint.stop()


def test_the_agents_openai_key_never_goes_to_the_vision_endpoint(monkeypatch):
    """The look tool's client carries NANOSEEK_VISION_API_KEY (or none), not OPENAI_API_KEY,
    which belongs to the agent's own endpoint."""
    from nanoseek.agent.tools.vision import _client
    monkeypatch.setenv("OPENAI_API_KEY", "sk-agents-own-key")
    monkeypatch.delenv("NANOSEEK_VISION_API_KEY", raising=False)
    assert _client("http://127.0.0.1:9/v1", 1.0, False).api_key == "none"
    monkeypatch.setenv("NANOSEEK_VISION_API_KEY", "vision-key")
    assert _client("http://127.0.0.1:9/v1", 1.0, False).api_key == "vision-key"
