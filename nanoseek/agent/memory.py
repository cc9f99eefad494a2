"""Persistent vector memory: what the agent learned in earlier runs, recalled by meaning.

On disk, in one directory: `memory.jsonl` (one `{"text", ...}` per line, appended) and
`embeddings.npy` (their vectors, rewritten atomically). At load the vectors go into a FAISS
index (nanoseek/agent/vector_store.py). The agent recalls the memories nearest to a new task
into its system prompt and stores each finished task with its answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nanoseek.agent.vector_store import VectorStore


class VectorMemory:
    def __init__(self, directory: str | Path, embed_fn=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = VectorStore(embed_fn)
        self._load()

    @property
    def texts_file(self) -> Path:
        return self.dir / "memory.jsonl"

    @property
    def vectors_file(self) -> Path:
        return self.dir / "embeddings.npy"

    def _load(self) -> None:
        if not self.texts_file.exists():
            return
        rows = [json.loads(line) for line in self.texts_file.read_text().splitlines() if line.strip()]
        vecs = np.load(self.vectors_file) if self.vectors_file.exists() else None
        if vecs is None or len(vecs) != len(rows):  # a crash between the two writes: re-embed
            vecs = None
        self.store.add([r["text"] for r in rows], rows, vecs)

    def add(self, text: str, **meta) -> None:
        row = {"text": text, **meta}
        self.store.add([text], [row])
        with open(self.texts_file, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp = self.dir / ".embeddings.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, self.store.vectors)
        os.replace(tmp, self.vectors_file)

    def recall(self, query: str, k: int = 3, min_score: float = 0.3) -> list[str]:
        return [t for s, t, _ in self.store.search(query, k) if s >= min_score]

    def __len__(self) -> int:
        return len(self.store.texts)
