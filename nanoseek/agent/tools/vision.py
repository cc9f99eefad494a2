"""`look(image, question)`: a text-only model sees through a vision-capable endpoint.

The model names one of the images the user gave the run (by index or name:
agent/images.pick_image), never a path or a URL, so the tool reads no file and fetches
nothing the user did not allow. The image and the question go, as one user message with an
image_url part, to an OpenAI-compatible endpoint the user named (`nanoseek agent
--vision-endpoint URL`: a loopback address unless remote endpoints are explicitly allowed),
and the reply's text is the observation. Bounded: the request's timeout, the reply's
max_tokens, the image's encoded bytes and the question's length.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from nanoseek.agent.images import AgentImage, pick_image
from nanoseek.agent.tools.base import Tool, ToolError

LOOK = "look"
MAX_QUESTION_CHARS = 2000
LOOPBACK_NAMES = ("localhost",)


def check_endpoint(url: str, allow_remote: bool = False) -> str:
    """The endpoint's /v1 URL, refused unless http(s) and (without allow_remote) loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--vision-endpoint {url!r}: expected an http(s) URL such as http://127.0.0.1:8001/v1")
    if not allow_remote and not _loopback(parts.hostname):
        raise ValueError(f"--vision-endpoint {url!r}: {parts.hostname} is not a loopback address; the "
                         "images would leave this machine (pass --vision-remote to allow it)")
    return url.rstrip("/")


def _client(url: str, timeout_s: float, allow_remote: bool):
    """An OpenAI client for `url` that goes nowhere else: no retries, no redirects (openai
    follows them by default, so a loopback server answering 307 would send the image on to
    any host), and no proxy from the environment (HTTP(S)_PROXY would carry a loopback
    request off the machine) unless remote endpoints are allowed. Its key is
    NANOSEEK_VISION_API_KEY, never the agent's OPENAI_API_KEY (which belongs to another host)."""
    from openai import DefaultHttpxClient, OpenAI
    http = DefaultHttpxClient(follow_redirects=False, trust_env=allow_remote, timeout=timeout_s)
    return OpenAI(base_url=url, api_key=os.environ.get("NANOSEEK_VISION_API_KEY") or "none", max_retries=0,
                  timeout=timeout_s, http_client=http)


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def look_tool(images: list[AgentImage], endpoint: str, model: str | None = None, *, timeout_s: float = 60.0,
              max_tokens: int = 256, max_image_bytes: int = 2 << 20, allow_remote: bool = False,
              client=None) -> Tool:
    """The `look` tool over `images`. `model`: the endpoint's model (None: the first it lists);
    `client`: an OpenAI client (tests), else one made for `endpoint` with no retries."""
    url = check_endpoint(endpoint, allow_remote)
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"--vision-timeout {timeout_s}: the seconds per look request must be positive and finite")
    if not images:
        raise ValueError("the look tool needs images: give them with --image FILE")
    if client is None:
        client = _client(url, timeout_s, allow_remote)
    chosen = {"model": model}

    def look(image, question: str = "Describe this image.") -> str:
        try:
            im = pick_image(images, image)
        except ValueError as e:
            raise ToolError(f"look: {e}") from None
        if not isinstance(question, str) or not question.strip():
            raise ToolError("look: the question must be non-empty text")
        if len(question) > MAX_QUESTION_CHARS:
            raise ToolError(f"look: a question of {len(question):,} characters; the limit is {MAX_QUESTION_CHARS:,}")
        if len(im.data) > max_image_bytes:
            raise ToolError(f"look: image {im.index} ({im.name}) is {len(im.data):,} bytes; the vision "
                            f"endpoint takes at most {max_image_bytes:,}")
        try:
            if chosen["model"] is None:
                chosen["model"] = next(iter(client.models.list())).id
            resp = client.chat.completions.create(
                model=chosen["model"], max_tokens=max_tokens, temperature=0, timeout=timeout_s,
                messages=[{"role": "user", "content": [{"type": "text", "text": question}, im.part()]}])
        except Exception as e:  # noqa: BLE001 - the endpoint's failure is the model's observation
            raise ToolError(f"look: the vision endpoint failed ({type(e).__name__}: {str(e)[:300]})") from None
        text = resp.choices[0].message.content or ""
        return f"image {im.index} ({im.name}): {text}"

    listed = "; ".join(im.label() for im in images)
    return Tool(LOOK, "Look at one of the images given with the task and answer a question about it "
                      f"(describe it, read its text). Images: {listed}.",
                {"type": "object", "properties": {
                    "image": {"type": ["integer", "string"], "description": "the image's index or name"},
                    "question": {"type": "string", "description": "what to find out, e.g. 'Read the text.'"}},
                 "required": ["image"]}, look, timeout_s=timeout_s + 5, sees=images)
