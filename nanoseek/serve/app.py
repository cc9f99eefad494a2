"""The OpenAI-compatible server: FastAPI routes over one `AsyncLLM`.

    app = create_app(AsyncLLM("runs/speedrun"), "speedrun")   # nanoseek serve runs it with uvicorn

A request's path: the door (guards.py: body size, API key) -> pydantic (protocol.py: strict
types and ranges, 400 naming the field) -> the model name (404) -> prompt and sampling params
(prompt_limit.py: the prompt's characters, before tokenising; images.py: image parts decoded
within limits, 400 for a text-only model; params.py: the chat template,
tokenised in a worker thread so the event loop keeps streaming, the context check;
tools.py: `tools` / `tool_choice`) -> the
response cache, for deterministic requests only -> admission (admission.py: 429 when the queue is full) -> the engine
(generation.py) -> OpenAI's JSON, or SSE chunks ending in `data: [DONE]` (responses.py).

The response-cache seam: `app.state.response_cache` is None or an object with
`lookup(key: dict) -> dict | None` and `store(key: dict, response: dict) -> None` (either may
be a coroutine; a plain function runs in a worker thread, since SQLite, Redis and the
semantic index block) — `nanoseek serve --cache` builds serve/cache's `ResponseCache`. `key`
is the normalised request (params.cache_key: endpoint, model, messages or prompt, every
sampling field, the caller's scope and the checkpoint's fingerprint); calls go through
serve/cache/seam.py, which bounds them and turns any failure into a miss; a hit is the
stored response dict plus a top-level `"_cache"` ("l1" exact, "l2" semantic), which the
server strips, counts in `nanoseek_response_cache_hits_total{level=...}`, and serves under
a fresh id (replayed as chunks when the client streams). Only completions that finished
cleanly are stored.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from nanoseek.serve import errors, page
from nanoseek.serve.admission import Admission
from nanoseek.serve.cache.seam import CacheSeam
from nanoseek.serve.errors import APIError, internal_error, sse_error
from nanoseek.serve.generation import failed, generate
from nanoseek.serve.guards import ApiKeys, BodyLimit
from nanoseek.serve.images import (SERVER_LIMITS, engine_images, engine_prompt, image_locations, request_images,
                                   served_vision)
from nanoseek.serve.metrics import CountRequests, ServerMetrics
from nanoseek.serve.params import chat_params, chat_prompt, check_context, completion_params, completion_prompts
from nanoseek.serve.prompt_limit import PromptLimit, chat_chars, completion_chars, prompt_count
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now
from nanoseek.serve.responses import ChatFormatter, CompletionFormatter, Formatter, replay_chunks
from nanoseek.serve.shutdown import AnswerWhenCut
from nanoseek.serve.tools import apply_tools

DONE = "data: [DONE]\n\n"


def create_app(llm, model_name: str, *, api_keys: list[str] | None = None, max_queue: int = 256,
               max_body_bytes: int = 4 << 20, max_prompt_chars: int | None = None, response_cache=None,
               drain_timeout_s: float = 5.0, cache_scope: str = "key", checkpoint=None,
               cache_timeout_s: float = 10.0, image_limits=SERVER_LIMITS, image_dir=None) -> FastAPI:
    """llm: an `AsyncLLM`. max_queue: completions that may wait beyond the engine's
    max_num_seqs before a request gets 429. max_prompt_chars: None for the most that can
    fit the context (prompt_limit.py). cache_scope "key" (each API key its own cached
    answers) or "shared"; checkpoint: the directory llm was loaded from, fingerprinted
    into every cache key (None: the model's tensors are hashed instead); cache_timeout_s:
    the most one cache call may take (serve/cache/seam.py). image_limits: a
    text.images.ImageLimits for chat image parts; image_dir: the one directory `file:` image
    URLs may read (None: file URLs are refused)."""
    app = FastAPI(title="nanoseek", lifespan=_lifespan)
    engine = llm.engine
    st = app.state
    st.llm, st.model_name, st.created = llm, model_name, now()
    st.max_model_len = engine.max_model_len
    st.prompt_limit = PromptLimit.of(llm.tokenizer, st.max_model_len, max_prompt_chars)
    st.admission = Admission(engine.config.max_num_seqs + max_queue)
    st.metrics = ServerMetrics(engine)
    st.metrics.in_flight.set_function(lambda: st.admission.in_flight)
    st.response_cache, st.drain_timeout_s = response_cache, drain_timeout_s
    st.image_limits, st.image_dir = image_limits, _image_dir(image_dir)
    st.vision = served_vision(llm, checkpoint)  # None: the model reads text only
    st.cache_seam = CacheSeam(st, api_keys=bool(api_keys), scope=cache_scope, checkpoint=checkpoint,
                              timeout_s=cache_timeout_s)
    errors.install(app)
    _routes(app)
    app.add_middleware(ApiKeys, keys=api_keys or [])
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(AnswerWhenCut)  # a request cut by shutdown: OpenAI's JSON, not uvicorn's text
    # outermost: counts 401s and 413s too, by the route matched (a bounded label set)
    app.add_middleware(CountRequests, counter=st.metrics.requests, routes=app.router.routes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    await drain(app.state.llm, app.state.drain_timeout_s)


async def drain(llm, timeout_s: float) -> None:
    """At shutdown (uvicorn has already let in-flight requests finish, up to its graceful
    timeout): abort whatever is left, so each stream ends with finish_reason "abort" and
    every block is freed, then stop the engine's loop."""
    for rid in list(llm.engine.requests):
        llm.abort(rid)
    for _ in range(int(timeout_s / 0.01)):
        if not llm.engine.has_unfinished():
            break
        await asyncio.sleep(0.01)
    await llm.shutdown()


def _routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        st = request.app.state
        return ModelList(data=[ModelCard(id=st.model_name, created=st.created, max_model_len=st.max_model_len)])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        st = _checked(request, req.model)
        params = chat_params(req)
        st.admission.check_size(params.n, "n")
        st.prompt_limit.check(chat_chars(req), "messages")
        images = []
        if image_locations(req.messages):  # decoding blocks: a worker thread
            images = await run_in_threadpool(request_images, req.messages, st.image_limits, st.image_dir)
        image_token_id = engine_images(st.llm, st.model_name, images, st.vision)
        prompt, params, tools = await run_in_threadpool(_chat_prompt, st.llm.tokenizer, req, params, image_token_id)
        prompt, prompt_len = await run_in_threadpool(engine_prompt, st.llm, prompt, images)
        check_context(range(prompt_len), params, st.max_model_len, "messages")
        fmt = ChatFormatter(req.model, st.llm.tokenizer, params.logprobs, prompt_len, *_usage_opts(req),
                            tools=tools)
        return await respond(request, "chat", req, [prompt], params, fmt, images)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        st = _checked(request, req.model)
        params = completion_params(req)
        count = prompt_count(req)
        st.admission.check_size(count * params.n, "prompt" if count > 1 else "n")
        for n in completion_chars(req):
            st.prompt_limit.check(n, "prompt")
        prompts = await run_in_threadpool(completion_prompts, st.llm.tokenizer, req,
                                          st.llm.engine.model.config.vocab_size)
        for p in prompts:
            check_context(p, params, st.max_model_len, "prompt")
        fmt = CompletionFormatter(req.model, st.llm.tokenizer, params.logprobs, sum(map(len, prompts)),
                                  *_usage_opts(req))
        return await respond(request, "completions", req, prompts, params, fmt)

    page.install(app)  # last: the chat page at / catches what the API's routes do not


def _chat_prompt(tokenizer, req: ChatCompletionRequest, params, image_token_id=None):
    """(prompt, params, tool reader): the chat's ids with a forced call's opening. Runs in a
    worker thread: tokenising a long prompt must not hold up every other client's stream."""
    return apply_tools(req, tokenizer, chat_prompt(tokenizer, req, image_token_id), params)


def _image_dir(path):
    if path is None:
        return None
    d = Path(path).resolve()
    if not d.is_dir():
        raise ValueError(f"image directory {str(path)!r} is not a directory")
    return d


def _checked(request: Request, model: str):
    st = request.app.state
    if model != st.model_name:
        raise APIError(404, f"model {model[:200]!r} does not exist; this server serves {st.model_name!r} "
                            "(see /v1/models)", param="model", code="model_not_found")
    return st


def _usage_opts(req) -> tuple[bool, bool]:
    o = req.stream_options
    return (bool(o and o.include_usage), bool(o and o.continuous_usage_stats))


# ----------------------------------------------------------------- respond
async def respond(request: Request, kind: str, req, prompts: list[list[int]], params, fmt: Formatter,
                  images=()):
    st = request.app.state
    key = await st.cache_seam.key(request, kind, req, images)  # images keyed by content hash
    if key is not None:
        hit = await st.cache_seam.lookup(key)  # a failing cache is a miss (seam.py)
        if hit is not None:
            return _cached(st, hit, fmt, req.stream)
        st.metrics.cache_misses.inc()
    k = len(prompts) * params.n
    st.admission.admit(k)  # 429 when full
    st.metrics.prompt_tokens.inc(fmt.prompt_tokens)
    updates = generate(st.llm, st.metrics, prompts, params)
    if req.stream:
        return _Stream(_sse(st, updates, fmt, key), on_close=lambda: st.admission.release(k))
    try:
        outs = await _collect(request, updates)
    finally:
        st.admission.release(k)
    if (err := failed(outs)) is not None:
        raise err
    body = fmt.response(outs)
    if key is not None and all(c.finish_reason in ("stop", "length") for c in outs.values()):
        await st.cache_seam.store(key, body)  # never raises: the answer is not lost
    return JSONResponse(body)


async def _collect(request: Request, updates) -> dict:
    """Run a non-streamed request to the end, unless its client hangs up first (then abort)."""
    outs: dict = {}

    async def consume():
        async for latest in updates:
            outs.update(latest)
    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                break
    finally:
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise APIError(499, "the client closed the connection", code="client_closed")
    task.result()  # raises the request's error, if any
    return outs


async def _sse(st, updates, fmt: Formatter, key: dict | None):
    outs: dict = {}
    try:
        async for latest in updates:
            outs.update(latest)
            for chunk in fmt.chunks(latest):
                yield f"data: {json.dumps(chunk)}\n\n"
        if (err := failed(outs)) is not None:
            yield sse_error(err)
        else:
            if fmt.include_usage:
                yield f"data: {json.dumps(fmt.usage_chunk())}\n\n"
            if key is not None and all(c.finish_reason in ("stop", "length") for c in outs.values()):
                await st.cache_seam.store(key, fmt.response(outs))  # never raises: [DONE] follows
    except APIError as e:
        yield sse_error(e)
    except Exception as e:  # noqa: BLE001 - our bug, mid-stream: an error event and [DONE], no detail
        yield sse_error(internal_error(e))
    finally:
        await updates.aclose()  # a hang-up: cancels the engine requests, frees their blocks
    yield DONE


def _cached(st, hit: dict, fmt: Formatter, stream: bool):
    hit = dict(hit)
    st.metrics.cache_hits.labels(level=hit.pop("_cache", "l1")).inc()
    hit["id"], hit["created"] = fmt.id, fmt.created
    if not stream:
        return JSONResponse(hit)

    async def replay():
        for chunk in replay_chunks(hit, fmt.include_usage):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield DONE
    return StreamingResponse(replay(), media_type="text/event-stream")


class _Stream(StreamingResponse):
    """SSE whose clean-up runs however the response ends — finished, or cancelled by a
    client that hung up (possibly before the body started, when the generator's own
    `finally` would never run)."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()
