"""Metrics: `metrics.jsonl` (one JSON record per line) and the on-device sums behind it.

The loop adds each step's values (device tensors) to an `IntervalMeans` and reads them
back once per logging interval: one host-device synchronisation per log line, not one
per micro-batch, so the accelerator's queue is not drained every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


class IntervalMeans:
    """Means over the steps since the last `read()`: tensors summed where they live,
    numbers as numbers, None kept as None (e.g. no MTP loss)."""

    def __init__(self):
        self.sums: dict = {}
        self.steps = 0

    def add(self, values: dict) -> None:
        for k, v in values.items():
            if v is None:
                self.sums.setdefault(k, None)
                continue
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            prev = self.sums.get(k)
            self.sums[k] = v if prev is None else prev + v
        self.steps += 1

    def read(self) -> dict:
        """The means as Python numbers (lists for vector metrics); one transfer for all the
        tensors. Starts the next interval."""
        keys = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        out = {k: (None if v is None else v / self.steps) for k, v in self.sums.items()
               if not torch.is_tensor(v)}
        if keys:
            flat = torch.cat([self.sums[k].flatten() for k in keys]).div(self.steps).tolist()
            i = 0
            for k in keys:
                n = self.sums[k].numel()
                out[k] = flat[i] if self.sums[k].dim() == 0 else flat[i:i + n]
                i += n
        self.sums, self.steps = {}, 0
        return out


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    """Metric records; a torn last line (the process was killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step` (the resumed checkpoint); rewritten atomically."""
    from nanoseek.checkpoint.atomic import atomic_write_text

    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
