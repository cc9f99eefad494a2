"""L1 in this process: an LRU dict with a time-to-live.

The default store: no set-up, microseconds a lookup, gone when the server stops. Reads move
an entry to the young end; a store past `max_entries` drops the least recently used.
An entry lives `ttl` seconds from when it was stored (reads do not extend it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class MemoryStore:
    name = "memory"

    def __init__(self, ttl: float | None = None, max_entries: int = 10000, clock=time.time):
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, value = entry
            if self.ttl is not None and self.clock() - stored_at >= self.ttl:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._entries[key] = (self.clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
