"""How the server calls its response cache (`app.state.response_cache`), so that the cache
can only ever save work, never fail, delay without bound or leak a request.

- **Whose answers.** The key carries the caller's scope (keys.caller_scope): with API keys
  set, a salted hash of the key the request authenticated with, so key B never gets key A's
  cached answer at either level; `cache_scope="shared"` (or a server without keys) puts
  every caller in one scope. The raw key is never part of the key.
- **Which model.** The key carries `serving_fingerprint` (fingerprint.py): the
  checkpoint's files by content plus dtype/device/FP8, computed once at start-up — so a
  persistent SQLite/Redis cache never answers for weights that were replaced.
- **Failure is a miss.** Each call is bounded by `timeout_s` (a backstop: `ResponseCache`
  bounds its own SQLite/Redis calls far tighter) and any exception or time-out is logged,
  counted in `nanoseek_response_cache_errors_total{layer="seam",op=...}`, and answered as a
  miss (lookup) or as nothing stored (store): the client gets its answer, the stream its
  `[DONE]`, and no message with the cache's address. A `ResponseCache` gets the server's
  metrics as its `on_error`, so its own per-level failures count there too.
"""

from __future__ import annotations

import functools
import inspect
import logging

import anyio

from nanoseek.serve.params import cache_key

from .fingerprint import serving_fingerprint
from .keys import caller_scope

log = logging.getLogger("nanoseek.serve.cache")
SCOPES = ("key", "shared")


class CacheSeam:
    def __init__(self, state, *, api_keys: bool, scope: str = "key", checkpoint=None,
                 timeout_s: float = 10.0):
        if scope not in SCOPES:
            raise ValueError(f"cache scope {scope!r}: expected one of {', '.join(SCOPES)}")
        if not timeout_s > 0:
            raise ValueError(f"cache timeout {timeout_s}: expected seconds > 0")
        self.st, self.per_key, self.timeout_s = state, api_keys and scope == "key", timeout_s
        self.fingerprint = None if checkpoint is None else serving_fingerprint(state.llm, checkpoint)

    def cache(self):
        cache = self.st.response_cache
        if cache is not None and getattr(cache, "on_error", False) is None:
            cache.on_error = self.st.metrics.cache_error
        return cache

    async def key(self, request, kind: str, req, images=()) -> dict | None:
        """The cache key of this request (None: no cache, or not deterministic); `images`:
        its decoded images, keyed by content hash in place of their URLs."""
        if self.cache() is None:
            return None
        try:
            if self.fingerprint is None:  # a model given as an object: hash its tensors, once
                self.fingerprint = await anyio.to_thread.run_sync(serving_fingerprint, self.st.llm)
            return cache_key(kind, req, caller_scope(bearer(request.scope), self.per_key), self.fingerprint,
                             images)
        except Exception as e:
            return self._failed("key", e)

    async def lookup(self, key: dict) -> dict | None:
        cache = self.cache()
        hit = None if cache is None else await self._call("lookup", cache.lookup, key)
        return hit if isinstance(hit, dict) else None

    async def store(self, key: dict, response: dict) -> None:
        cache = self.cache()
        if cache is not None:
            await self._call("store", cache.store, key, response)

    async def _call(self, op: str, fn, *args):
        try:
            with anyio.fail_after(self.timeout_s):
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args)
                # a worker thread: SQLite, Redis and an embedding block; abandoned on time-out
                return await anyio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)
        except Exception as e:
            return self._failed(op, e)

    def _failed(self, op: str, e: Exception) -> None:
        log.warning("response cache %s failed, served without it: %s: %s", op, type(e).__name__, e)
        self.st.metrics.cache_error("seam", op)


def bearer(scope) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, read as guards.ApiKeys reads it (the
    header it checked), so the scope is the key that was verified."""
    auth = dict(scope["headers"]).get(b"authorization", b"")
    kind, _, token = auth.partition(b" ")
    if kind.lower() != b"bearer":
        return None
    return token.strip().decode("latin-1")
