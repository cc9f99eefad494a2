"""Data parallelism for the dense weights: FSDP2 `fully_shard` over the dp mesh dimension.

Every transformer block is its own FSDP unit (its parameters are gathered just before it
runs and freed after); the root holds the embedding, the final norm, the head and the MTP
modules (whose shared head is called from outside their forward, so they stay gathered for
the whole `loss` call). Routed experts are left out (`ignored_params`): EP owns them, and their replicas (dp/ep
of each) add their gradients with one all-reduce (runtime.py). FSDP could not hold them
anyway: an expert that got no token on one rank has no gradient there, and FSDP's
reduce-scatter needs the same tensors on every rank. The loop
calls `model.loss`, not `forward`, so `loss` is registered as an FSDP forward method.

FSDP averages gradients over dp; our losses are already each rank's share of the global sum
(targets counted over every rank, see runtime.py), so `undo_mean` multiplies the dense
gradients back by dp (exact: dp is a power of two in every layout we test, and the
multiplication of a float by its count of equal shares is the sum FSDP's mean divided).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from nanoseek.parallel.expert_parallel import is_expert_param


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the blocks and the root over the dp `mesh`, routed experts left out."""
    ignored = {p for n, p in model.named_parameters() if is_expert_param(n)}
    for unit in model.model.layers:
        fully_shard(unit, mesh=mesh, ignored_params=ignored & set(unit.parameters()) or None)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    register_fsdp_forward_method(model, "loss")


@torch.no_grad()
def undo_mean(params: list[nn.Parameter], dp: int) -> None:
    """FSDP's reduce-scatter averaged these (dense) gradients over dp ranks: make them sums."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, float(dp))
