"""A sharded run's checkpoint (RUN/checkpoint/, written by parallel/sharded_state.py) as a
plain HF directory: the model's config comes from the run's run.json."""

from __future__ import annotations

from pathlib import Path

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.parallel.sharded_state import CHECKPOINT_DIR, consolidated_model, exists
from nanoseek.train.run.run_settings import read_settings


def consolidate(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write RUN/checkpoint as a plain HF directory (config.json + safetensors) into
    out_dir (default: the run directory itself)."""
    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    if settings is None:
        raise FileNotFoundError(f"{run_dir}: no run.json, cannot tell the model's config")
    if not exists(run_dir):
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR}: no sharded checkpoint")
    out = Path(out_dir or run_dir)
    save_pretrained(consolidated_model(run_dir / CHECKPOINT_DIR, settings.model), out)
    return out
