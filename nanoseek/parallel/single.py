"""`SingleProcess`: the `Parallel` (runtime.py) of a run on one process, which does nothing.

The training loop asks its `Parallel` for the step's global target counts, the summed
gradients and logged values, the gradient norm, the token count and an agreed clock. On
one process each of them is what the process has: the wrappers return the loss and count
unchanged, the reductions return their argument, and the gradient norm is torch's
`clip_grad_norm_` (or the plain norm when clipping is off), exactly the arithmetic a
one-process run always did. So the loop has one path and no `parallel is None` test.
"""

from __future__ import annotations

import torch
from torch import nn


class SingleProcess:
    distributed = False  # no process group: train_state.pt (not DCP) checkpoints, bf16 weight copies
    rank, is_main = 0, True
    dp = ep = tp = pp = 1
    dp_rank = 0
    replicate = False

    def owns(self, name: str) -> bool:
        return True

    def local_rows(self, batch: tuple) -> tuple:
        return batch

    def wrap_count(self, count_targets):
        return count_targets

    def wrap_loss(self, loss_fn):
        return loss_fn

    def pipeline_step(self, batches: list, targets) -> dict:
        raise RuntimeError("pipeline parallelism needs several processes")

    def after_backward(self, model: nn.Module, sums: dict) -> dict:
        return sums

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The gradient norm, clipped to max_norm when > 0."""
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))

    def step_metrics(self) -> dict:
        return {}

    def global_count(self, n: int) -> int:
        return n

    def agree(self, seconds: float) -> float:
        return seconds

    def agree_stop(self, signum: int | None) -> int | None:
        return signum

    def barrier(self) -> None:
        pass


def runtime_for(model: nn.Module, cfg, device: torch.device):
    """The run's `Parallel` for a ParallelConfig under torchrun, a SingleProcess for None
    (runtime.py, and torch.distributed's tensor modules, are imported only when needed)."""
    if cfg is None:
        return SingleProcess()
    from nanoseek.parallel.runtime import Parallel
    return Parallel(model, cfg, device)
