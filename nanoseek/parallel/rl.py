"""GRPO on several processes: data parallel with replicated weights, each rank sampling its
own share of a step's prompts with its own engine.

Why replicated weights (DDP's way) and not FSDP2: the rollout engine runs the policy module
it was given, reading its weights directly, and it runs a different number of forwards on
each rank (its own prompts, its own completion lengths). With FSDP2 the weights would be
shards, gathered by collectives inside each forward, which ranks that run different
numbers of forwards cannot pair up. So every rank keeps the whole model; after the backward
the gradients are summed over the ranks with one all-reduce (runtime.py, `replicate`),
every rank takes the same optimizer step, and the weights stay identical everywhere. For
the same reason GRPO splits the model no further (no ep, tp, pp): those would put
collectives inside the engine's forwards too.

What is split and what is global:
  * prompts: rank r of dp takes the r-th contiguous slice of the step's batch_size prompts,
    and completion k of global prompt i keeps its one-process seed (seed·n + i·G + k), so
    the union of the ranks' rollouts is the one-process rollout;
  * advantages are per group and a group never leaves its rank; the rewards are still
    gathered, for scale_rewards="batch" (the batch std is the global one) and the logged
    statistics (reward, accuracy, lengths: over every rank's completions);
  * the loss's divisors (completion tokens, completions) are counted over every rank (the
    Trainer's `Parallel.wrap_count`), so the summed gradient equals the one-process one;
  * the held-out evaluation is split the same way and its sums added.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): rank's contiguous slice of n items (as `Parallel.local_rows` cuts rows)."""
    return rank * n // world, (rank + 1) * n // world


def gather_scores(scores: dict[str, torch.Tensor], group, device) -> dict[str, torch.Tensor]:
    """Per-completion scores ([n] each, n the same on every rank) -> every rank's, in rank
    order (= the one-process order of the completions). `device`: where the collective
    runs (the rank's GPU under NCCL)."""
    keys = sorted(scores)
    mine = torch.stack([scores[k].double() for k in keys]).to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    whole = torch.cat(parts, dim=1).cpu()
    return {k: whole[i].to(scores[k].dtype) for i, k in enumerate(keys)}


def max_over(value: float, group, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def mean_over(means: dict[str, float], n: int, group, device) -> dict[str, float]:
    """Means over each rank's n items -> the means over every rank's items."""
    keys = sorted(means)
    t = torch.tensor([means[k] * n for k in keys] + [n], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    total = max(float(t[-1]), 1.0)
    return {k: float(t[i]) / total for i, k in enumerate(keys)}
