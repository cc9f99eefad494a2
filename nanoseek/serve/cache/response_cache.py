"""The response cache the server calls: L1 exact match, then (opt-in) L2 semantic.

L3 is the engine's prefix cache (engine/), which needs nothing from here. The server hands
over the normalised request as a dict (model, messages or prompt, every sampling field: all
that changes the answer, nothing that does not) and the response dict it sent:

    cache = ResponseCache.from_url(url, semantic=..., on_event=metrics_callback)
    hit = cache.lookup(key)       # a fresh dict, hit["_cache"] = "l1" | "l2"; or None
    ...
    cache.store(key, response)

Only deterministic requests (keys.cacheable) are looked up or stored. `on_event(level, hit)`
fires for every level a lookup consults, so Prometheus can count hits and misses per level.
A level that fails is a miss (failsafe.py): `lookup` and `store` never raise for a broken
Redis or SQLite; `on_error(level, op)` fires instead, and when the backend itself failed
that operation is bypassed for `cooldown` seconds. An L2 candidate is served only when the question's critical tokens
(numbers, units, negations, ordering words, names: critical.py) equal the cached one's.
Calls are thread-safe; the memory store costs microseconds, SQLite/Redis a round trip
(each bounded by `timeout`), and L2 an embedding (~10 ms on a CPU): an async server calls it
through a thread pool.
"""

from __future__ import annotations

import json
import threading
import time

from . import critical, keys
from .failsafe import FAILED, Breaker
from .stores import open_store
from .urls import DEFAULT_TIMEOUT

LEVEL = "_cache"  # the key a hit carries, naming the level that answered


class ResponseCache:
    def __init__(self, store, semantic=None, embedder=None, on_event=None, on_error=None,
                 cooldown: float = 5.0, monotonic=time.monotonic):
        self.l1, self.l2, self.embedder = store, semantic, embedder
        self.on_event, self.on_error = on_event, on_error
        self.check_critical = True  # off only to measure what the check costs
        self._guard = {level: Breaker(level, cooldown, self._failed, monotonic) for level in ("l1", "l2")}
        self._counts = {"l1_hits": 0, "l1_misses": 0, "l2_hits": 0, "l2_misses": 0,
                        "l2_vetoed": 0, "uncacheable": 0, "stores": 0}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str | None = None, semantic: bool = False, threshold: float = 0.9,
                 ttl: float | None = None, max_entries: int = 10000, on_event=None, on_error=None,
                 timeout: float = DEFAULT_TIMEOUT, cooldown: float = 5.0,
                 clock=time.time) -> ResponseCache:
        """L1 where `url` says (urls.ACCEPTED); L2 when `semantic`. A missing package fails
        here, naming it, and so does a Redis that does not answer at start-up; the embedding
        model itself loads on the first semantic call (`warm()` loads it now). `timeout`
        bounds each SQLite/Redis call (seconds)."""
        store = open_store(url, ttl=ttl, max_entries=max_entries, clock=clock, timeout=timeout)
        index = embedder = None
        if semantic:
            from .embedder import MiniLMEmbedder, model_path
            from .semantic import SemanticIndex

            embedder = MiniLMEmbedder(model_path())
            index = SemanticIndex(embedder.dim, threshold=threshold, ttl=ttl,
                                  max_entries=max_entries, clock=clock)
        return cls(store, index, embedder, on_event, on_error, cooldown)

    cacheable = staticmethod(keys.cacheable)

    def warm(self) -> None:
        """Load the embedding model now (a server does, before its first request)."""
        if self.embedder is not None:
            self.embedder("warm-up")

    def lookup(self, key: dict) -> dict | None:
        """The cached response for `key` with `["_cache"]` naming the level, or None (also
        when a level fails)."""
        if not keys.cacheable(key):
            self._count("uncacheable")
            return None
        value = self._guard["l1"].call("lookup", self._get, keys.l1_key(key))
        self._event("l1", value is not None)
        if value is not None:
            return {**value, LEVEL: "l1"}
        if self.l2 is None or self._guard["l1"].cooling("lookup"):
            return None  # L2 answers from L1's entries: nothing to gain while L1 is down
        value = self._guard["l2"].call("lookup", self._semantic_lookup, key)
        self._event("l2", value is not None)
        return None if value is None else {**value, LEVEL: "l2"}

    def _get(self, l1_key: str) -> dict | None:
        value = self.l1.get(l1_key)
        if value is None:
            return None
        value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"cached response {l1_key[:12]}... is not a JSON object")
        return value

    def _semantic_lookup(self, key: dict) -> dict | None:
        parts = keys.semantic_parts(key)
        if parts is None:
            return None
        text, context = parts
        vector = self.embedder(text)
        if vector is None:  # past the embedding's window: the tail would not be compared
            return None
        mine = critical.signature(text) if self.check_critical else None
        for _, l1_key, tag in self.l2.search(vector, context):
            if mine is not None and tag != mine:
                self._count("l2_vetoed")  # near in meaning, but a number or a "not" differs
                continue
            value = self._guard["l1"].call("lookup", self._get, l1_key, default=FAILED)
            if value is FAILED:
                return None
            if value is not None:
                return value
            self.l2.discard(l1_key)  # its response left L1 (evicted or expired)
        return None

    def store(self, key: dict, response: dict) -> None:
        """Remember `response` for `key` (deterministic keys only; a `_cache` marker on the
        response is not stored). A level that fails stores nothing, silently to the caller."""
        if not keys.cacheable(key):
            return
        l1_key = keys.l1_key(key)
        value = {k: v for k, v in response.items() if k != LEVEL}
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if self._guard["l1"].call("store", self.l1.put, l1_key, value, default=FAILED) is FAILED:
            return
        self._count("stores")
        if self.l2 is not None:
            self._guard["l2"].call("store", self._semantic_store, key, l1_key)

    def _semantic_store(self, key: dict, l1_key: str) -> None:
        parts = keys.semantic_parts(key)
        if parts is None:
            return
        text, context = parts
        vector = self.embedder(text)
        if vector is not None:
            self.l2.add(vector, context, l1_key, critical.signature(text))

    def stats(self) -> dict:
        """Counts since start (hits, misses, L2 candidates vetoed by the critical tokens,
        failures per level and op, calls bypassed after a failure), entry counts per level
        (None when the store does not answer), and where L1 lives."""
        with self._lock:
            out = dict(self._counts)
        out["errors"] = {k: v for g in self._guard.values() for k, v in g.errors.items()}
        out["bypassed"] = sum(g.bypassed for g in self._guard.values())
        try:
            l1_entries = len(self.l1)
        except Exception:
            l1_entries = None
        out.update(backend=self.l1.name, l1_entries=l1_entries,
                   semantic=self.l2 is not None,
                   l2_entries=0 if self.l2 is None else len(self.l2))
        return out

    def clear(self) -> None:
        self.l1.clear()
        if self.l2 is not None:
            self.l2.clear()

    def _failed(self, level: str, op: str) -> None:
        if self.on_error is not None:
            self.on_error(level, op)

    def _event(self, level: str, hit: bool) -> None:
        self._count(f"{level}_{'hits' if hit else 'misses'}")
        if self.on_event is not None:
            self.on_event(level, hit)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
