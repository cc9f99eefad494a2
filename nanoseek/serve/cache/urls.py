"""Where L1 lives, from one URL: `memory`, a SQLite file, or a Redis server.

SQLite URLs read as SQLAlchemy's: three slashes then a relative path, four for an absolute
one (`sqlite:////var/cache/nanoseek.db`).
"""

from __future__ import annotations

import time
from pathlib import Path

ACCEPTED = ("None or 'memory' (in-process LRU); 'sqlite:///relative/file.db', "
            "'sqlite:////absolute/file.db' or a plain path ending .db/.sqlite/.sqlite3 (SQLite "
            "file); 'redis://host:port/db', 'rediss://...' or 'unix:///socket' (Redis)")


def open_store(url: str | None, ttl: float | None, max_entries: int, clock=time.time):
    """The L1 store `url` names; ValueError naming the URL and the accepted forms otherwise."""
    from .memory import MemoryStore
    from .redis_store import RedisStore
    from .sqlite import SQLiteStore

    if ttl is not None and ttl <= 0:
        raise ValueError(f"response cache ttl={ttl}: expected seconds > 0, or None for no expiry")
    if max_entries < 1:
        raise ValueError(f"response cache max_entries={max_entries}: expected at least 1")
    limits = dict(ttl=ttl, max_entries=max_entries, clock=clock)
    if url is None or url == "memory":
        return MemoryStore(**limits)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, **limits)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite:///"):]), **limits)
    if "://" not in url and url.endswith((".db", ".sqlite", ".sqlite3")):
        return SQLiteStore(Path(url), **limits)
    raise ValueError(f"response cache URL {url!r} not understood; accepted: {ACCEPTED}")
