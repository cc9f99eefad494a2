"""SwiGLU feed-forward: the dense FFN of the first layers, and every expert's shape.

DeepSeek-V4 clamps the SwiGLU inputs of its experts (routed and shared, `swiglu_limit`,
10 in V4-Flash/Pro; 0 = no clamp, the V2/V3 expert):
    y = W_down (SiLU(min(W_gate x, L)) ⊙ clamp(W_up x, -L, L))
"""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu_limit > 0:
            limit = self.swiglu_limit
            gate = self.gate_proj(x).clamp(max=limit)
            up = self.up_proj(x).clamp(min=-limit, max=limit)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
