"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek and transformers do); V4's unweighted per-head form."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def head_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) per head, no weight (V4's query normalisation)."""
    return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)).to(x.dtype)
