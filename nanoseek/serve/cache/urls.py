"""The L1 URLs' vocabulary: `memory`, a SQLite file, or a Redis server (stores.py opens them).

SQLite URLs read as SQLAlchemy's: three slashes then a relative path, four for an absolute
one (`sqlite:////var/cache/nanoseek.db`). `timeout` bounds each call to SQLite (its busy
timeout) or Redis (socket connect and read timeouts), so a locked file or a stalled server
costs at most that before the call fails (and failsafe.py makes the failure a miss).
Messages show a URL without its password (`redact`).
"""

from __future__ import annotations

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
