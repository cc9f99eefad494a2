"""Every failure the server reports, in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` with the status a client acts on —
400 for a bad request (malformed JSON, a wrong type, a value out of range, a prompt longer
than the context), 401 without a valid key, 404 for an unknown model or path, 413 for a
body over the limit, 429 when the queue is full (with Retry-After), 500 for our own bugs,
503 for a request cut by shutdown. An error never takes the server down: the request fails,
the next one is served. A 500 says only that something failed and under which id the
server's log holds the traceback: exception text can hold paths, addresses or other users'
data. Bodies are written with non-ASCII escaped, so no string a client sent can make an
error unwritable.
"""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "internal_error", 503: "service_unavailable"}
log = logging.getLogger("nanoseek.serve")
# what pydantic puts in an error's location for a union's alternative (`str`, `list[int]`,
# `TextPart`, `function-after[...]`): never a field, dropped from `param`
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


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


class ErrorJSON(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()  # ASCII: a lone surrogate is escaped


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return ErrorJSON(error_body(status, message, param, code), status_code=status, headers=headers)


def internal_error(exc: BaseException, what: str = "internal error") -> APIError:
    """A 500 that names no detail of `exc`; the traceback goes to the log under an id."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", what, ref, exc_info=exc)
    return APIError(500, f"{what}: the server failed to handle this request (error id {ref} in its log)",
                    code="internal_error")


def sse_error(e: APIError) -> str:
    """A failure after a stream has started (its 200 is already sent): one event, as vLLM."""
    return f"data: {json.dumps(e.body())}\n\n"


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's complaint, first error only, as one sentence naming the field."""
    err = _first(list(exc.errors()))
    if err.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                              code="invalid_json")
    if "param" in (err.get("ctx") or {}):  # our own check says where (protocol.py's lone surrogates)
        return error_response(400, err["msg"], param=err["ctx"]["param"], code="invalid_value")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not _is_tag(p)]  # a union's alternative is no field: keep the field's path
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    return error_response(400, f"{param or 'body'}: {msg}" + _got(err), param=param, code="invalid_value")


def _is_tag(p) -> bool:
    return isinstance(p, str) and ("[" in p or p[:1].isupper() or p in _TYPE_TAGS)


def _first(errors: list[dict]) -> dict:
    """The error to report. A value no alternative of a union accepts gets one error per
    alternative (`content: [5]` is neither a string nor a list of text parts); report the
    alternative that got furthest — one of the input's own kind (its errors lie deeper than
    the alternative itself), then the fewest errors, then the deepest — so the message is
    about the list's element, not "should be a string"."""
    loc = errors[0].get("loc", ())
    at = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
    if at is None:
        return errors[0]
    head = loc[:at]
    alts: dict = {}
    for e in errors:
        el = e.get("loc", ())
        if el[:at] == head and len(el) > at and _is_tag(el[at]):
            alts.setdefault(el[at], []).append(e)
    best = min(alts.values(), key=lambda es: (min(len(e["loc"]) for e in es) == at + 1, len(es),
                                              -max(len(e["loc"]) for e in es)))
    inner = _first([{**e, "loc": e["loc"][at + 1:]} for e in best])  # a union inside the alternative
    return {**inner, "loc": head + (best[0]["loc"][at],) + tuple(inner["loc"])}


def _got(err: dict) -> str:
    """What was sent instead, short: a scalar only (a list or object would be long, and is
    described by the message)."""
    v = err.get("input")
    if "input" not in err or err.get("type") == "missing" or isinstance(v, (dict, list)):
        return ""
    text = json.dumps(v[:81] if isinstance(v, str) else v, default=str)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return ErrorJSON(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        what = {400: "the request body could not be parsed as JSON (it is not UTF-8, or nests too deeply)",
                404: f"no route {request.method} {request.url.path[:200]}",
                405: f"method {request.method} is not allowed on {request.url.path[:200]}"}
        code = {400: "invalid_json"}.get(exc.status_code)  # FastAPI's 400: a body json.loads refused
        return error_response(exc.status_code, what.get(exc.status_code, str(exc.detail)), code=code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        e = internal_error(exc)
        return error_response(e.status, e.message, code=e.code)
