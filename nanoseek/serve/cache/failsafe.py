"""A cache that fails is a miss: every call into a cache level runs through a `Breaker`.

A response cache only saves work, so its failure must never fail a request: a call that
raises (Redis down or paused past its socket timeout, a SQLite file locked past its busy
timeout, a corrupt entry) is logged, counted, and answered with the caller's default — a
miss for a lookup, nothing stored for a store. After a failure of the store itself (an
OSError, a time-out, a SQLite or Redis error) that operation of the level is bypassed for `cooldown` seconds (returns the default at once), so a dead Redis costs one
timeout per operation, not one per request, and a SQLite file whose writes are locked by
another process still serves its reads (WAL); the next call after the cool-down tries again.
Any other exception (say, a text the embedder chokes on) is counted and logged too, but
bypasses nothing: one client's odd request must not switch the cache off for everyone. The stores
themselves bound each call's time (socket / busy timeouts), so nothing here blocks.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

log = logging.getLogger("nanoseek.serve.cache")

FAILED = object()  # the default that lets a caller tell "failed" from "absent"


class Breaker:
    def __init__(self, layer: str, cooldown: float = 5.0, report=None, monotonic=time.monotonic):
        self.layer, self.cooldown, self.report, self.monotonic = layer, cooldown, report, monotonic
        self.errors: dict[str, int] = {}
        self.bypassed = 0
        self._open_until: dict[str, float] = {}  # op -> monotonic time it may be tried again
        self._lock = threading.Lock()

    def call(self, op: str, fn, *args, default=None):
        """fn(*args), or `default` when it raises or the level is cooling down."""
        if self.cooling(op):
            with self._lock:
                self.bypassed += 1
            return default
        try:
            return fn(*args)
        except Exception as e:  # any failure of a cache is a miss, never the request's
            self._failed(op, e)
            return default

    def cooling(self, op: str) -> bool:
        with self._lock:
            return self.monotonic() < self._open_until.get(op, float("-inf"))

    def _failed(self, op: str, e: Exception) -> None:
        opens = _store_failure(e)
        with self._lock:
            if opens:
                self._open_until[op] = self.monotonic() + self.cooldown
            name = f"{self.layer}.{op}"
            self.errors[name] = self.errors.get(name, 0) + 1
        log.warning("response cache %s %s failed, served without it%s: %s: %s", self.layer, op,
                    f" for {self.cooldown:.1f} s" if opens else "", type(e).__name__, e)
        if self.report is not None:
            self.report(self.layer, op)


def _store_failure(e: Exception) -> bool:
    """The backend failed (unreachable, stalled, locked), as opposed to this one call's data."""
    return isinstance(e, (OSError, sqlite3.Error)) or type(e).__module__.split(".")[0] == "redis"
