"""Every failure the server reports, in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` with the status a client acts on —
400 for a bad request (malformed JSON, a wrong type, a value out of range, a prompt longer
than the context), 401 without a valid key, 404 for an unknown model or path, 413 for a
body over the limit, 429 when the queue is full (with Retry-After), 500 for our own bugs.
An error never takes the server down: the request fails, the next one is served.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def sse_error(e: APIError) -> str:
    """A failure after a stream has started (its 200 is already sent): one event, as vLLM."""
    return f"data: {json.dumps(e.body())}\n\n"


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's complaint, first error only, as one sentence naming the field."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                              code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # a field that accepts several types reports each alternative: keep the field's name only
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "list")] or loc
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    return error_response(400, f"{param or 'body'}: {msg}" + _got(err), param=param, code="invalid_value")


def _got(err: dict) -> str:
    if "input" not in err or err.get("type") == "missing":
        return ""
    text = json.dumps(err["input"], default=str)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        what = {404: f"no route {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, what.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
