"""Token arrays: tokenise once, memory-map forever.

Every document becomes `bos ids eos`; documents are split train / validation by a seeded
draw per document (deterministic, and a document never straddles the split), then
concatenated into `train.bin` / `val.bin` (uint16 when the vocabulary fits, else
uint32) beside a `meta.json`. The files are keyed by a fingerprint of the text and the
tokenizer, so a second run on the same data reads them back instead of tokenising again.

Batches are drawn at random offsets by a generator seeded from (seed, step, micro-step):
the *data position* of a run is just its step number, which makes resuming exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.data.corpus import CorpusError


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Each document goes to validation with probability val_fraction (seeded); both sides
    get at least one document when there are two or more; a single document stays in
    training (the caller holds out the tail of its tokens)."""
    rng = random.Random(seed)
    is_val = [rng.random() < val_fraction for _ in docs]
    if len(docs) == 1:
        is_val = [False]
    if len(docs) >= 2 and val_fraction > 0:
        if not any(is_val):
            is_val[rng.randrange(len(docs))] = True
        if all(is_val):
            is_val[rng.randrange(len(docs))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def token_bytes(ids: np.ndarray, tokenizer) -> int:
    """UTF-8 bytes of the text tokens among `ids` (special tokens have none)."""
    from nanoseek.text.tokenizer import token_byte_lengths

    lengths = np.asarray(token_byte_lengths(tokenizer), dtype=np.int64)
    return int(lengths[np.asarray(ids, dtype=np.int64)].sum()) if len(ids) else 0


def fingerprint(docs: list[str], tokenizer, val_fraction: float, seed: int) -> str:
    h = hashlib.sha256(f"{val_fraction}:{seed}:{len(docs)}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]


def encode_documents(docs: list[str], tokenizer, batch: int = 256) -> np.ndarray:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[int] = []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            out += [bos, *ids, eos]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(out, dtype=dtype)


@dataclass
class TokenArrays:
    """Memory-mapped train / validation tokens and what the metrics need about them."""
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> "TokenArrays":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise CorpusError(f"{directory}: no meta.json, not a token-array directory")
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for name in ("train", "val"):
            path = directory / f"{name}.bin"
            n = path.stat().st_size // dtype.itemsize if path.exists() else -1
            if n != meta[f"{name}_tokens"]:
                raise CorpusError(f"{path}: expected {meta[f'{name}_tokens']} tokens, found {n} "
                                  "(truncated? delete the directory to re-tokenise)")
            arrays.append(np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype))
        return cls(arrays[0], arrays[1], meta)

    # ------------------------------------------------------------------ batches
    def batch(self, step: int, micro: int, batch_size: int, seq_len: int, seed: int):
        """Random windows of the training tokens -> (input_ids, labels) [B, seq_len] each;
        the same (seed, step, micro) always gives the same batch."""
        n = len(self.train) - seq_len - 1  # the last valid window start
        if n < 0:
            raise CorpusError(f"training split has {len(self.train)} tokens, fewer than "
                              f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len or more data")
        g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (1 << 62))
        starts = torch.randint(0, n + 1, (batch_size,), generator=g).tolist()
        rows = np.stack([np.asarray(self.train[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def val_windows(self, seq_len: int, max_tokens: int | None = None, batch_size: int = 8):
        """Non-overlapping validation windows, in order: every token after the first of a
        window is predicted exactly once. Yields (input_ids, labels) [b, seq_len]."""
        n_windows = (len(self.val) - 1) // seq_len
        if max_tokens:
            n_windows = min(n_windows, max(1, max_tokens // seq_len))
        if n_windows <= 0:
            raise CorpusError(f"validation split has {len(self.val)} tokens, fewer than "
                              f"seq_len + 1 = {seq_len + 1}")
        for i in range(0, n_windows, batch_size):
            rows = [np.asarray(self.val[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64)
                    for w in range(i, min(i + batch_size, n_windows))]
            t = torch.from_numpy(np.stack(rows))
            yield t[:, :-1], t[:, 1:]

    # -------------------------------------------------------------- baselines
    def unigram_baseline(self, seq_len: int, byte_lengths: list[int], max_tokens: int | None = None) -> dict:
        """Cross-entropy on the validation windows of the training tokens' unigram
        distribution (add-one smoothed): the loss of a model that ignores context."""
        V = len(byte_lengths)
        counts = np.bincount(np.asarray(self.train, dtype=np.int64), minlength=V)[:V] + 1.0
        logp = torch.from_numpy(np.log(counts / counts.sum()))
        blen = torch.tensor(byte_lengths, dtype=torch.float64)
        nats = tokens = text_nats = nbytes = 0.0
        for _, y in self.val_windows(seq_len, max_tokens):
            lp = -logp[y]
            nats += float(lp.sum())
            tokens += y.numel()
            b = blen[y]
            text_nats += float(lp[b > 0].sum())
            nbytes += float(b.sum())
        return {"unigram_loss": nats / tokens, "unigram_bpb": text_nats / (math.log(2) * nbytes)}


def build_token_arrays(docs: list[str], tokenizer, directory: str | Path, val_fraction: float = 0.1,
                       seed: int = 0) -> TokenArrays:
    """Tokenise `docs` into `directory` (or reuse the arrays already there for the same
    docs and tokenizer) and memory-map them."""
    if not docs:
        raise CorpusError("the corpus holds no documents")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(docs, tokenizer, val_fraction, seed)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("fingerprint") == fp:
                return TokenArrays.open(directory)
        except (CorpusError, json.JSONDecodeError, KeyError):
            pass  # stale or broken: rebuild below
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    train, val = encode_documents(train_docs, tokenizer), encode_documents(val_docs, tokenizer)
    val_bytes = sum(len(d.encode()) for d in val_docs)
    if not val_docs:  # a single document: hold out the tail of its tokens
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:]
        val_bytes = token_bytes(val, tokenizer)
    for name, arr in (("train", train), ("val", val)):
        atomic_write(directory / f"{name}.bin", lambda tmp, a=arr: a.tofile(tmp))
    meta = {"fingerprint": fp, "dtype": train.dtype.name, "train_tokens": int(len(train)),
            "val_tokens": int(len(val)), "train_docs": len(train_docs), "val_docs": len(val_docs),
            "val_fraction": val_fraction, "seed": seed, "vocab_size": len(tokenizer),
            "val_bytes": val_bytes, "tail_split": not val_docs}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return TokenArrays.open(directory)
