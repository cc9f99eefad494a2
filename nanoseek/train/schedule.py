"""Learning-rate schedules: linear warm-up, then cosine decay or WSD.

WSD (warm-up, stable, decay; MiniCPM, and DeepSeek-V3's own pretraining schedule is a
step-wise variant of it) holds the peak rate and decays only over the last `decay_frac`
of the steps, so a run can be extended from any checkpoint of its stable phase.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, max_lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(warmup_steps, int(max_steps * (1 - decay_frac)))
    if step < decay_start:
        return max_lr
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return max_lr + (min_lr - max_lr) * progress
