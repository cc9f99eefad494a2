"""A small OpenAI-compatible endpoint for the agent's tests: FastAPI on 127.0.0.1 on a free
port, answering /v1/chat/completions from a scripted "model" (a function of the request
body that returns the assistant message, or `(status, error message)`). Every request body
is kept in `requests`, so tests see exactly what the agent sent."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mock_endpoint(script):
    """Yields (base_url, requests)."""
    app, requests = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append(body)
        out = script(body)
        if isinstance(out, tuple):
            status, message = out
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}},
                                status_code=status)
        finish = "tool_calls" if out.get("tool_calls") else "stop"
        return {"id": f"chatcmpl-{len(requests)}", "object": "chat.completion", "created": 0,
                "model": body["model"], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **out}}]}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        if not th.is_alive():
            raise RuntimeError("the mock endpoint did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", requests
    finally:
        server.should_exit = True
        th.join(10)


def call(name: str, args: dict, i: int = 0) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def native_model(body: dict) -> dict:
    """Calls the calculator (and lists the workspace) first, then answers with what came back."""
    msgs = body["messages"]
    if msgs[-1]["role"] == "tool":
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        return {"content": f"The product is {results[0]}."}
    assert body.get("tools"), "the native model expects tools"
    return {"content": "Let me compute.", "tool_calls": [call("calculator", {"expression": "123 * 456"}),
                                                         call("calculator", {"expression": "1/0"}, 1)]}


def text_model(body: dict):
    """Rejects `tools` (HTTP 400) and speaks the text protocol."""
    if body.get("tools"):
        return 400, "this model does not support tools"
    last = body["messages"][-1]["content"]
    if last.startswith("Observation from calculator:"):
        return {"content": f"The product is {last.split(':', 1)[1].strip()}."}
    return {"content": 'I will use the calculator.\n```tool_call\n'
                       '{"name": "calculator", "arguments": {"expression": "123 * 456"}}\n```'}


def repeating_model(body: dict) -> dict:
    """Never answers: the same call again and again."""
    return {"content": "", "tool_calls": [call("calculator", {"expression": "2+2"})]}


if __name__ == "__main__":  # `python -m tests.agent_mock [native|text]`: serve until Ctrl-C
    import sys
    model = {"native": native_model, "text": text_model}[sys.argv[1] if len(sys.argv) > 1 else "native"]
    with mock_endpoint(model) as (url, _):
        print(f"mock endpoint at {url}", flush=True)
        threading.Event().wait()
