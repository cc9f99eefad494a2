"""Where L1 lives, from one URL: `memory`, a SQLite file, or a Redis server.

SQLite URLs read as SQLAlchemy's: three slashes then a relative path, four for an absolute
one (`sqlite:////var/cache/nanoseek.db`). `timeout` bounds each call to SQLite (its busy
timeout) or Redis (socket connect and read timeouts), so a locked file or a stalled server
costs at most that before the call fails (and failsafe.py makes the failure a miss).
Messages show a URL without its password (`redact`).
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_TIMEOUT = 0.5  # seconds a SQLite or Redis call may take before it counts as failed

ACCEPTED = ("None or 'memory' (in-process LRU); 'sqlite:///relative/file.db', "
            "'sqlite:////absolute/file.db' or a plain path ending .db/.sqlite/.sqlite3 (SQLite "
            "file); 'redis://host:port/db', 'rediss://...' or 'unix:///socket' (Redis)")


def redact(url: str) -> str:
    """`url` with any password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def open_store(url: str | None, ttl: float | None, max_entries: int, clock=time.time,
               timeout: float = DEFAULT_TIMEOUT):
    """The L1 store `url` names; ValueError naming the URL and the accepted forms otherwise."""
    from .memory import MemoryStore
    from .redis_store import RedisStore
    from .sqlite import SQLiteStore

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
