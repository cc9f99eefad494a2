"""Tensor parallelism with DTensor `parallelize_module` (Megatron's layout, MLA-aware).

MLA: the per-head up-projections q_b_proj (or q_proj) and kv_b_proj are split column-wise,
i.e. by heads, so each TP rank computes attention for n_heads/tp heads from the replicated
latents c_q and c_KV; o_proj is split row-wise and its partial outputs are all-reduced. The
down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms stay replicated: they are
small, and the latent they produce is what every head needs (as in torchtitan's V3).
Dense FFN: gate/up column-wise, down row-wise. MoE layers are not split by TP (their
experts are sharded by EP instead); their inputs are replicated, so TP ranks route alike.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from nanoseek.model.attention import MLA
from nanoseek.model.mlp import MLP


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
        if isinstance(block.mlp, MLP):
            parallelize_module(block.mlp, mesh, {"gate_proj": ColwiseParallel(),
                                                 "up_proj": ColwiseParallel(),
                                                 "down_proj": RowwiseParallel()})
