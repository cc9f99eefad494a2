"""A request cut by shutdown still gets OpenAI's JSON.

On SIGTERM uvicorn stops accepting connections, lets in-flight requests run for its
graceful timeout (`nanoseek serve --shutdown-timeout`), then cancels their tasks; a
request whose answer had not started (a non-streamed completion) then got uvicorn's own
plain-text "Internal Server Error", which OpenAI clients cannot read. This ASGI middleware
answers such a request with a 503 in OpenAI's shape (code `server_shutting_down`) instead.
A stream has sent its 200 already: it ends as it did (its engine requests aborted).
"""

from __future__ import annotations

import asyncio

from nanoseek.serve.errors import error_response

WHY = ("the server is shutting down and cut this request before it finished (the graceful shutdown "
       "timeout passed); retry it")


class AnswerWhenCut:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started:
                raise
            asyncio.current_task().uncancel()  # the cancel is handled: the task ends with this answer
            await error_response(503, WHY, code="server_shutting_down",
                                 headers={"Retry-After": "1"})(scope, receive, send)
