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
Calls are thread-safe; the memory store costs microseconds, SQLite/Redis a round trip, and
L2 an embedding (~10 ms on a CPU): an async server calls it through a thread pool.
"""

from __future__ import annotations

import json
import threading
import time

from . import keys
from .urls import open_store

LEVEL = "_cache"  # the key a hit carries, naming the level that answered


class ResponseCache:
    def __init__(self, store, semantic=None, embedder=None, on_event=None):
        self.l1, self.l2, self.embedder = store, semantic, embedder
        self.on_event = on_event
        self._counts = {"l1_hits": 0, "l1_misses": 0, "l2_hits": 0, "l2_misses": 0,
                        "uncacheable": 0, "stores": 0}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str | None = None, semantic: bool = False, threshold: float = 0.9,
                 ttl: float | None = None, max_entries: int = 10000, on_event=None,
                 clock=time.time) -> ResponseCache:
        """L1 where `url` says (urls.ACCEPTED); L2 when `semantic`. A missing package fails
        here, naming it; the embedding model itself loads on the first semantic lookup."""
        store = open_store(url, ttl=ttl, max_entries=max_entries, clock=clock)
        index = embedder = None
        if semantic:
            from .embedder import MiniLMEmbedder, model_path
            from .semantic import SemanticIndex

            embedder = MiniLMEmbedder(model_path())
            index = SemanticIndex(embedder.dim, threshold=threshold, ttl=ttl,
                                  max_entries=max_entries, clock=clock)
        return cls(store, index, embedder, on_event)

    cacheable = staticmethod(keys.cacheable)

    def lookup(self, key: dict) -> dict | None:
        """The cached response for `key` with `["_cache"]` naming the level, or None."""
        if not keys.cacheable(key):
            self._count("uncacheable")
            return None
        value = self.l1.get(keys.l1_key(key))
        self._event("l1", value is not None)
        if value is not None:
            return {**json.loads(value), LEVEL: "l1"}
        if self.l2 is None:
            return None
        value = self._semantic_lookup(key)
        self._event("l2", value is not None)
        return None if value is None else {**json.loads(value), LEVEL: "l2"}

    def _semantic_lookup(self, key: dict) -> str | None:
        parts = keys.semantic_parts(key)
        if parts is None:
            return None
        text, context = parts
        for _, l1_key in self.l2.search(self.embedder(text), context):
            value = self.l1.get(l1_key)
            if value is not None:
                return value
            self.l2.discard(l1_key)  # its response left L1 (evicted or expired)
        return None

    def store(self, key: dict, response: dict) -> None:
        """Remember `response` for `key` (deterministic keys only; a `_cache` marker on the
        response is not stored)."""
        if not keys.cacheable(key):
            return
        l1_key = keys.l1_key(key)
        value = {k: v for k, v in response.items() if k != LEVEL}
        self.l1.put(l1_key, json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        self._count("stores")
        if self.l2 is not None and (parts := keys.semantic_parts(key)) is not None:
            text, context = parts
            self.l2.add(self.embedder(text), context, l1_key)

    def stats(self) -> dict:
        """Counts since start, entry counts per level, and where L1 lives."""
        with self._lock:
            out = dict(self._counts)
        out.update(backend=self.l1.name, l1_entries=len(self.l1),
                   semantic=self.l2 is not None,
                   l2_entries=0 if self.l2 is None else len(self.l2))
        return out

    def clear(self) -> None:
        self.l1.clear()
        if self.l2 is not None:
            self.l2.clear()

    def _event(self, level: str, hit: bool) -> None:
        self._count(f"{level}_{'hits' if hit else 'misses'}")
        if self.on_event is not None:
            self.on_event(level, hit)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
