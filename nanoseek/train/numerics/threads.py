"""Pick the CPU thread count while training, because a shared machine changes under you.

On a quiet 2-core CPU two torch threads run a tiny-preset step in ~0.6 s against ~1.1 s
for one. When other processes crowd the cores, OpenMP threads wait for descheduled peers
and two threads fall to 2-5 s a step while one thread keeps ~1.2 s (measured on this
project's CI-like VM). So every `every` steps one step runs with the other count; if it
beats the recent median by `margin`, the run switches. The cost is one step in `every`
run at a possibly worse count.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch


class ThreadTuner:
    def __init__(self, max_threads: int, every: int = 25, window: int = 8, margin: float = 0.15):
        self.max_threads, self.every, self.margin = max_threads, every, margin
        self.current = max_threads
        self.recent: deque[float] = deque(maxlen=window)
        self.trial: int | None = None

    def before_step(self, step: int) -> int:
        """Set and return the thread count for this step."""
        other = 1 if self.current == self.max_threads else self.max_threads
        trying = (self.max_threads > 1 and step > 0 and step % self.every == 0
                  and len(self.recent) >= 3)
        self.trial = other if trying else None
        n = self.trial or self.current
        torch.set_num_threads(n)
        return n

    def after_step(self, seconds: float) -> None:
        if self.trial is None:
            self.recent.append(seconds)
            return
        if seconds < (1 - self.margin) * statistics.median(self.recent):
            self.current = self.trial
            self.recent.clear()
            self.recent.append(seconds)
        torch.set_num_threads(self.current)
        self.trial = None
