"""Texts and their embeddings, searched by cosine similarity with a FAISS IndexFlatIP
(exact search; the stores here hold thousands of texts, not millions). The embedding
function is a parameter so that tests and other models can stand in for MiniLM."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class VectorStore:
    def __init__(self, embed_fn: Callable[[list[str]], np.ndarray] | None = None):
        if embed_fn is None:
            from nanoseek.agent.embeddings import embed as embed_fn
        self.embed_fn = embed_fn
        self.texts: list[str] = []
        self.meta: list[dict] = []
        self.vectors: np.ndarray | None = None
        self.index = None

    def add(self, texts: list[str], meta: list[dict] | None = None,
            vectors: np.ndarray | None = None) -> np.ndarray:
        """Add texts (embedded here unless `vectors` are given); returns their vectors."""
        import faiss
        if not texts:
            return np.zeros((0, 0), np.float32)
        vecs = np.ascontiguousarray(self.embed_fn(texts) if vectors is None else vectors, np.float32)
        if self.index is None:
            self.index = faiss.IndexFlatIP(vecs.shape[1])
        elif vecs.shape[1] != self.index.d:
            raise ValueError(f"embeddings of dimension {vecs.shape[1]}, the store holds {self.index.d}")
        self.index.add(vecs)
        self.texts += texts
        self.meta += meta or [{} for _ in texts]
        self.vectors = vecs if self.vectors is None else np.concatenate([self.vectors, vecs])
        return vecs

    def search(self, query: str, k: int = 3) -> list[tuple[float, str, dict]]:
        """The k nearest texts as (cosine similarity, text, meta), best first."""
        if not self.texts:
            return []
        q = np.ascontiguousarray(self.embed_fn([query]), np.float32)
        scores, ids = self.index.search(q, min(k, len(self.texts)))
        return [(float(s), self.texts[i], self.meta[i]) for s, i in zip(scores[0], ids[0]) if i >= 0]
