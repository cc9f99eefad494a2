"""L2: the nearest earlier question by cosine, among requests with the same context.

One FAISS inner-product index per context (model, system prompt, earlier turns, sampling
fields: keys.semantic_parts), so a search only ever sees questions whose answer would be
valid here, and the nearest such question is never hidden behind closer ones asked in
another context. Vectors are unit length, so inner product = cosine. Each vector points at
the L1 entry holding its response; entries follow the same TTL, and past `max_entries` the
oldest vector goes first. The index lives in this process (it is rebuilt as traffic
arrives after a restart, while a SQLite or Redis L1 persists).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict

import numpy as np

CANDIDATES = 8  # neighbours fetched per search; stale ones are skipped, then removed


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the semantic response cache needs the 'faiss-cpu' package "
                          "(pip install 'nanoseek[cache]')") from e
    return faiss


class SemanticIndex:
    def __init__(self, dim: int, threshold: float = 0.9, ttl: float | None = None,
                 max_entries: int = 10000, clock=time.time):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"semantic cache threshold={threshold}: a cosine, expected in [-1, 1]")
        self.dim, self.threshold, self.ttl, self.max_entries = dim, threshold, ttl, max_entries
        self.clock = clock
        self._faiss = _faiss()
        self._by_context: dict[str, object] = {}  # context digest -> faiss IndexIDMap2
        self._entries: OrderedDict[int, tuple] = OrderedDict()  # id -> ctx, l1 key, t, tag
        self._by_l1: dict[str, int] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def add(self, vector: np.ndarray, context: str, l1_key: str, tag=None) -> None:
        """`tag`: what a search hands back with the match (the question's critical tokens),
        for the caller to veto a near neighbour that differs where it matters."""
        with self._lock:
            self._remove(self._by_l1.get(l1_key))
            index = self._by_context.get(context)
            if index is None:
                index = self._faiss.IndexIDMap2(self._faiss.IndexFlatIP(self.dim))
                self._by_context[context] = index
            vid = next(self._ids)
            index.add_with_ids(vector.reshape(1, -1).astype(np.float32), np.array([vid], np.int64))
            self._entries[vid] = (context, l1_key, self.clock(), tag)
            self._by_l1[l1_key] = vid
            while len(self._entries) > self.max_entries:
                self._remove(next(iter(self._entries)))

    def search(self, vector: np.ndarray, context: str) -> list[tuple[float, str, object]]:
        """(cosine, L1 key, tag) of live neighbours at or above the threshold, nearest first."""
        with self._lock:
            index = self._by_context.get(context)
            if index is None or index.ntotal == 0:
                return []
            k = min(CANDIDATES, index.ntotal)
            scores, ids = index.search(vector.reshape(1, -1).astype(np.float32), k)
            out = []
            for score, vid in zip(scores[0].tolist(), ids[0].tolist()):
                if vid < 0 or score < self.threshold:
                    continue
                _, l1_key, stored_at, tag = self._entries[vid]
                if self.ttl is not None and self.clock() - stored_at >= self.ttl:
                    self._remove(vid)
                    continue
                out.append((score, l1_key, tag))
            return out

    def discard(self, l1_key: str) -> None:
        """Forget the vector of an L1 entry that is gone (evicted or expired there)."""
        with self._lock:
            self._remove(self._by_l1.get(l1_key))

    def _remove(self, vid: int | None) -> None:
        if vid is None or vid not in self._entries:
            return
        context, l1_key, *_ = self._entries.pop(vid)
        self._by_l1.pop(l1_key, None)
        index = self._by_context[context]
        index.remove_ids(np.array([vid], np.int64))
        if index.ntotal == 0:
            del self._by_context[context]

    def clear(self) -> None:
        with self._lock:
            self._by_context.clear()
            self._entries.clear()
            self._by_l1.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
