"""The chat page at `/`: the files of nanoseek/serve/static/ (index.html, chat.js, chat.css),
or a one-line placeholder when a build ships without them.

The page is mounted at `/`, after the API's routes, so it catches every path they do not
match. The API's own paths must not fall through to a file lookup: StaticFiles would answer
405 to any POST (so a POST to an unknown `/v1/...` path would not be a 404) and 404 to a GET
on `/v1/chat/completions` (which is a 405). Paths under `/v1` keep the API's answers.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = "<!doctype html><title>nanoseek</title><p>nanoseek serves the OpenAI API at <code>/v1</code>."


class ChatPage(StaticFiles):
    def __init__(self, api_paths: set[str]):
        super().__init__(directory=STATIC, html=True)
        self.api_paths = api_paths

    async def get_response(self, path: str, scope):
        route = scope["path"]
        if route == "/v1" or route.startswith("/v1/"):
            raise HTTPException(405 if route in self.api_paths else 404)  # errors.py words it as OpenAI's JSON
        return await super().get_response(path, scope)


def install(app: FastAPI) -> None:
    """Call after every API route is defined."""
    if STATIC.is_dir():
        api_paths = {r.path for r in app.routes if isinstance(r, APIRoute)}
        app.mount("/", ChatPage(api_paths), name="static")
    else:
        @app.get("/", response_class=HTMLResponse)
        async def index():
            return PLACEHOLDER
