"""Where L1 lives, from one URL (the forms are urls.ACCEPTED): the in-process LRU, a
SQLite file or a Redis server. Apart from urls.py because the stores import its timeout
and `redact`, and this module imports the stores.
"""

from __future__ import annotations

import time
from pathlib import Path

from .memory import MemoryStore
from .redis_store import RedisStore
from .sqlite import SQLiteStore
from .urls import ACCEPTED, DEFAULT_TIMEOUT, redact


def open_store(url: str | None, ttl: float | None, max_entries: int, clock=time.time,
               timeout: float = DEFAULT_TIMEOUT):
    """The L1 store `url` names; ValueError naming the URL and the accepted forms otherwise."""
    if ttl is not None and ttl <= 0:
        raise ValueError(f"response cache ttl={ttl}: expected seconds > 0, or None for no expiry")
    if max_entries < 1:
        raise ValueError(f"response cache max_entries={max_entries}: expected at least 1")
    if not timeout > 0:
        raise ValueError(f"response cache timeout={timeout}: expected seconds > 0")
    limits = dict(ttl=ttl, max_entries=max_entries, clock=clock)
    if url is None or url == "memory":
        return MemoryStore(**limits)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, timeout=timeout, **limits)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite:///"):]), timeout=timeout, **limits)
    if "://" not in url and url.endswith((".db", ".sqlite", ".sqlite3")):
        return SQLiteStore(Path(url), timeout=timeout, **limits)
    raise ValueError(f"response cache URL {redact(url)!r} not understood; accepted: {ACCEPTED}")
