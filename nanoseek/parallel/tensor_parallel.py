"""Tensor parallelism with DTensor `parallelize_module` (Megatron's layout, MLA-aware).

MLA: the per-head up-projections q_b_proj (or q_proj) and kv_b_proj are split column-wise,
i.e. by heads, so each TP rank computes attention for n_heads/tp heads from the replicated
latents c_q and c_KV; o_proj is split row-wise and its partial outputs are all-reduced. The
down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms stay replicated: they are
small, and the latent they produce is what every head needs (as in torchtitan's V3).
One MLA-specific piece: k_pe, the rotary key, is a single head shared by every head, so
each TP rank's attention adds only its own heads' share to k_pe's gradient. The shared
part of kv_a_proj_with_mqa's output therefore goes through Megatron's "f" operator
(identity forward, all-reduce backward); c_KV needs none, since kv_b_proj's column-wise
input already reduces its gradient.
Dense FFN: gate/up column-wise, down row-wise. MoE layers are not split by TP (their
experts are sharded by EP instead); their inputs are replicated, so TP ranks route alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from nanoseek.model.attention import MLA
from nanoseek.model.mlp import MLP


class CopyToTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _share_k_pe(attn: MLA, group) -> None:
    r = attn.kv_lora_rank

    def hook(module, args, out):
        return torch.cat([out[..., :r], CopyToTP.apply(out[..., r:], group)], dim=-1)
    attn.kv_a_proj_with_mqa.register_forward_hook(hook)


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    tp = mesh.size()
    for block in [*model.model.layers, *model.mtp]:
        attn = block.self_attn
        if not isinstance(attn, MLA):
            raise ValueError(f"tensor parallel supports MLA attention, got {type(attn).__name__}")
        if attn.n_heads % tp:
            raise ValueError(f"tp={tp} must divide num_attention_heads={attn.n_heads}")
        q = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        parallelize_module(attn, mesh, {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(),
                                        "o_proj": RowwiseParallel()})
        attn.n_heads //= tp  # each rank's heads
        _share_k_pe(attn, mesh.get_group())
        if isinstance(block.mlp, MLP):
            parallelize_module(block.mlp, mesh, {"gate_proj": ColwiseParallel(),
                                                 "up_proj": ColwiseParallel(),
                                                 "down_proj": RowwiseParallel()})
