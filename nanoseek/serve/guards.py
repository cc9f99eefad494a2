"""What stops a request at the door, before any JSON is parsed: a body over the size
limit (413) and, when API keys are set, a missing or wrong `Authorization: Bearer` (401).

Both are plain ASGI middleware so they run before FastAPI reads the body: an oversized
upload is refused from its Content-Length, or cut off as soon as its chunks pass the
limit, never buffered whole. Keys guard the API (`/v1/...`); `/health`, `/metrics` and
the chat page stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac

from nanoseek.serve.errors import error_response


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(length))
        seen, refused = 0, False

        async def counted():  # chunked upload: refuse once past the limit, hang up on the app
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                refused = True
                await self._refuse(scope, receive, send, seen, "at least ")
                return {"type": "http.disconnect"}
            return message

        async def quiet_send(message):  # the app's own answer to the hang-up goes nowhere
            if not refused:
                await send(message)
        return await self.app(scope, counted, quiet_send)

    def _why(self, size: int, prefix: str = "") -> str:
        return (f"the request body ({prefix}{size} bytes) exceeds the server's limit of {self.max_bytes} bytes "
                "(nanoseek serve --max-body-bytes)")

    async def _refuse(self, scope, receive, send, size: int, prefix: str = ""):
        await error_response(413, self._why(size, prefix), code="body_too_large")(scope, receive, send)


class ApiKeys:
    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys if k]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys):
            return await self.app(scope, receive, send)
        why = "no API key given (send 'Authorization: Bearer KEY')" if not auth else "the API key is not valid"
        await error_response(401, why, code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
