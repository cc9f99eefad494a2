"""L1 in a SQLite file: survives restarts, shared by every worker on one machine.

Each write is one transaction (readers see the old row or the new one, never half), and
WAL mode with a busy timeout lets several processes read and write the same file. The row
cap evicts oldest-first by store time (FIFO, not LRU: a read then costs no write).

Every call is bounded by `timeout`: SQLite's busy timeout (how long a statement waits for
another process's lock) and the wait for this store's own connection lock, so a file
locked by another process (`BEGIN EXCLUSIVE`) makes a call fail in about `timeout` seconds
(twice that at worst) instead of queueing every lookup behind a blocked write.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .urls import DEFAULT_TIMEOUT

SETUP_TIMEOUT = 10.0  # seconds opening the file may wait for a lock (once, at start-up)

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL,
                                      stored_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS responses_stored_at ON responses (stored_at);
"""


class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: str | Path, ttl: float | None = None, max_entries: int = 10000,
                 clock=time.time, timeout: float = DEFAULT_TIMEOUT):
        self.path, self.ttl, self.max_entries, self.clock = Path(path), ttl, max_entries, clock
        self.timeout = timeout
        if not self.path.parent.is_dir():
            raise ValueError(f"SQLite cache {self.path}: directory {self.path.parent} does not exist")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=max(timeout, SETUP_TIMEOUT),
                                   check_same_thread=False,
                                   isolation_level=None)  # transactions spelled out below
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA busy_timeout={max(1, int(timeout * 1000))}")

    @contextmanager
    def _locked(self):
        if not self._lock.acquire(timeout=self.timeout):
            raise TimeoutError(f"SQLite cache busy: its connection was held past {self.timeout} s")
        try:
            yield
        finally:
            self._lock.release()

    def get(self, key: str) -> str | None:
        with self._locked():
            row = self._db.execute("SELECT value, stored_at FROM responses WHERE key = ?",
                                   (key,)).fetchone()
        if row is None:
            return None
        value, stored_at = row
        if self.ttl is not None and self.clock() - stored_at >= self.ttl:
            return None  # expired rows are removed by the next put
        return value

    def put(self, key: str, value: str) -> None:
        now = self.clock()
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock first: no upgrade deadlock
            try:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                                 (key, value, now))
                if self.ttl is not None:
                    self._db.execute("DELETE FROM responses WHERE stored_at <= ?",
                                     (now - self.ttl,))
                self._db.execute(
                    "DELETE FROM responses WHERE key IN (SELECT key FROM responses "
                    "ORDER BY stored_at DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_entries,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._locked():
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def clear(self) -> None:
        with self._locked():
            self._db.execute("DELETE FROM responses")

    def close(self) -> None:
        with self._lock:
            self._db.close()
