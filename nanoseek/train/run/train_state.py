"""Resumable training state that survives `kill -9` at any moment.

`train_state.pt` holds everything a run needs to continue exactly as if never stopped:
the model's tensors (buffers included: the router biases of the aux-loss-free update),
the optimizer and gradient-scaler state, the step (which is also the data position, see
data/tokenized.py), tokens seen, elapsed time and every RNG state. It is written to a
temporary file, fsynced and renamed over the old one (`nanoseek.checkpoint.atomic.atomic_write`),
so at every instant the file on disk is a complete checkpoint: the previous one or the
new one. Leftover temporary files of an interrupted write are deleted on resume.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint.atomic import atomic_write

STATE_FILE = "train_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(out_dir: Path, state: dict) -> Path:
    """Atomically write `state` (tensors, optimizer dicts, plain values) to train_state.pt."""
    path = Path(out_dir) / STATE_FILE
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def clean_leftovers(out_dir: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted (atomic_write names
    them `.NAME.XXXX.tmp`; the tokenizer is staged in `.tokenizer.XXXX/`)."""
    import shutil

    for leftover in out_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    for staged in out_dir.glob(".tokenizer.*"):
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)


def load_state(out_dir: Path) -> dict | None:
    """The last complete state of a run, or None when it never saved one."""
    out_dir = Path(out_dir)
    clean_leftovers(out_dir)
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"{path}: cannot be read ({e}); it was written atomically, so "
                           "the file was damaged after the fact") from None
