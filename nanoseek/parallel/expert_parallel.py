"""Expert parallelism: each rank of an EP group keeps n_routed_experts / ep routed experts
and the token-slots routed to an expert travel to its rank and back with all-to-all.

`MoE.dispatch(x, weights, indices)` is the seam: single-process it sorts the token-slots by
expert and runs every expert on its slice; here the same sorted slots are cut by
destination rank instead, the per-expert counts are exchanged first (so every rank knows
how many rows it will receive from each peer, for each of its experts), the rows go out with
`all_to_all_single`, each local expert runs once on everything it received, and the outputs
come back the way they went. The backward of an all-to-all is the all-to-all with the split
sizes swapped, so gradients follow the tokens home.

The owned experts stay under their global names (`experts.5.gate_proj.weight` on the rank
that owns expert 5), so a checkpoint's keys are the same whatever the number of ranks.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.parallel.placement import PlacementStats, expert_owner


class A2ATimer:
    """Seconds spent inside the all-to-alls (forward and backward) since the last `take()`.
    Exact on CPU, where the collective returns when done; on GPUs it times the launch."""
    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        s, cls.seconds = cls.seconds, 0.0
        return s


def _timed_a2a(out, x, out_splits, in_splits, group) -> None:
    t = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    A2ATimer.seconds += time.perf_counter() - t


class AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: rows x[sum(in_splits)] -> out[sum(out_splits)]."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _timed_a2a(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        _timed_a2a(back, grad.contiguous(), in_splits, out_splits, ctx.group)
        return back, None, None, None


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [E] (slots this rank sends to each global expert) -> [ep, E/ep]: row s holds how
    many slots rank s sends to each of this rank's experts."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts)
    _timed_a2a(received, counts, None, None, group)
    return received.view(ep, -1)


class ExpertParallelDispatch:
    """Replaces one MoE layer's `dispatch` (a plain object, not a module: the experts stay in
    `moe.experts`, now a ModuleDict of the owned ones)."""

    def __init__(self, moe: nn.Module, group, stats: PlacementStats | None = None):
        self.moe, self.group = moe, group
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_local = moe.n_experts // self.ep
        self.first = self.rank * self.n_local
        self.stats = stats

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        moe, ep, n_local = self.moe, self.ep, self.n_local
        flat_idx = indices.flatten()
        order = flat_idx.argsort(stable=True)  # slots by expert = by owning rank, then expert
        token_of_slot = order // moe.top_k
        counts = torch.bincount(flat_idx, minlength=moe.n_experts)
        received = exchange_counts(counts, self.group)  # [src, local expert]
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        if self.stats is not None and moe.training:
            self.stats.add(indices, send_splits, recv_splits, self.rank, x)
        routed = AllToAll.apply(x[token_of_slot], recv_splits, send_splits, self.group)
        out = self._run_experts(routed, received)
        back = AllToAll.apply(out, send_splits, recv_splits, self.group)
        back = back * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, back)

    def _run_experts(self, routed: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Rows arrive grouped by source rank, then expert; group them by expert, run each
        local expert once, and restore the arrival order. routed[:0] keeps the output tied
        to the input even when nothing arrived: every rank must run the backward
        all-to-all, or its peers wait for it."""
        expert_of_row = torch.arange(self.n_local, device=routed.device).repeat(self.ep)
        expert_of_row = expert_of_row.repeat_interleave(received.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        per_expert = received.sum(0).tolist()
        chunks = routed[by_expert].split(per_expert)
        outs = [routed[:0]] + [self.moe.experts[str(self.first + e)](c)
                               for e, c in enumerate(chunks) if per_expert[e]]
        out = torch.cat(outs)
        return torch.empty_like(out).index_copy_(0, by_expert, out)


def shard_experts(moe: nn.Module, group, stats: PlacementStats | None = None) -> None:
    """Keep this rank's experts (under their global indices) and route through all-to-all."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    owned = [e for e in range(moe.n_experts) if expert_owner(e, moe.n_experts, ep) == rank]
    moe.experts = nn.ModuleDict({str(e): moe.experts[e] for e in owned})
    moe.dispatch = ExpertParallelDispatch(moe, group, stats)


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (`...mlp.experts.N...`; not `shared_experts`, not the router)."""
    return ".experts." in f".{name}"
