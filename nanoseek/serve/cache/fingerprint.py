"""Which model answered: a fingerprint of the weights, config and tokenizer behind a cached
response, so that a checkpoint replaced in the same directory (or served under the same
name) never answers with the old model's responses from a persistent cache.

`checkpoint_fingerprint(dir)` hashes the files a checkpoint is loaded from — `*.json`
(config, safetensors index, tokenizer and generation configs), `*.safetensors`, and
tokenizer side files (`*.model`, `*.tiktoken`, `*.txt`) — by content, never by path:

- a file up to `FULL_HASH_MAX` (256 MiB) is hashed whole (sha256 ran at 0.6 s per GiB of
  data already in memory on the 2-core build VM), so a small checkpoint's weights
  overwritten in place, with the same size and mtime, still change the fingerprint;
- a larger file (a real model's shards) by its size, mtime_ns, inode and device, the sha256
  of its safetensors header (tensor names, dtypes, shapes, offsets) and of 16 blocks of
  64 KiB spread over it. A shard rewritten in place with the same size, its mtime set back
  and none of the sampled blocks changed would go unnoticed: rewriting a shard without
  touching its mtime takes intent, and the samples catch any retraining, which changes
  every block.

`serving_fingerprint` adds what the loaded model runs with (dtype, device type, FP8
backend); without a directory it hashes the model's tensors in memory instead.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

FULL_HASH_MAX = 256 << 20
SAMPLES, SAMPLE_BYTES = 16, 64 << 10
HEADER_MAX = 100 << 20  # safetensors caps its JSON header at 100 MB
PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt")


def checkpoint_fingerprint(path: str | os.PathLike, full_hash_max: int = FULL_HASH_MAX) -> str:
    """sha256 over (name, content digest) of the checkpoint directory's model files."""
    root = Path(path)
    files = sorted({f for pattern in PATTERNS for f in root.glob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"{root}: no checkpoint files ({', '.join(PATTERNS)}) to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_digest(f, full_hash_max)}\n".encode())
    return h.hexdigest()


def file_digest(f: Path, full_hash_max: int = FULL_HASH_MAX) -> str:
    st = f.stat()
    with open(f, "rb") as fh:
        if st.st_size <= full_hash_max:
            return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
        h = hashlib.sha256(_safetensors_header(fh, st.st_size) if f.suffix == ".safetensors" else b"")
        block = min(SAMPLE_BYTES, st.st_size)
        step = max(1, (st.st_size - block) // (SAMPLES - 1))
        for k in range(SAMPLES):
            fh.seek(min(k * step, st.st_size - block))
            h.update(fh.read(block))
    return f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}:{h.hexdigest()}"


def _safetensors_header(fh, size: int) -> bytes:
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        return head
    (n,) = struct.unpack("<Q", head)
    return head + fh.read(min(n, HEADER_MAX, size - 8))


def model_fingerprint(model, tokenizer=None) -> str:
    """sha256 of a model's tensors as they sit in memory (names, dtypes, shapes, bytes) and
    its tokenizer's JSON: for a model that was not loaded from a directory."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    inner = getattr(tokenizer, "tok", tokenizer)
    if hasattr(inner, "to_str"):
        h.update(inner.to_str().encode())
    return h.hexdigest()


def serving_fingerprint(llm, checkpoint: str | os.PathLike | None = None) -> str:
    """The checkpoint's files (or, without a directory, the model in memory) plus how it
    runs: dtype, device type and FP8 backend change the numbers, hence the answers."""
    model = llm.engine.model
    param = next(model.parameters())
    files = checkpoint_fingerprint(checkpoint) if checkpoint is not None else \
        model_fingerprint(model, llm.engine.tokenizer)
    run = f"{param.dtype}|{param.device.type}|{getattr(llm, 'quantization_backend', None)}"
    return hashlib.sha256(f"{files}\n{run}".encode()).hexdigest()
