"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 §2.2): n residual streams mixed by pre/post/comb.

The residual is n = hc_mult streams X ∈ R^{n×D} per token. Around each sub-layer F (attention,
FFN) one linear map of the RMS-normed, flattened streams gives the three mixings:
    [p̃ | q̃ | C̃] = (vec(X) · fnᵀ) / rms(vec(X)),          fn ∈ R^{(2+n)n × nD}
    pre  = σ(α_pre · p̃ + b_pre) + ε                      ∈ R^n
    post = 2 σ(α_post · q̃ + b_post)                      ∈ R^n
    comb = Sinkhorn(softmax(α_res · C̃ + B_res) + ε)      ∈ R^{n×n}, doubly stochastic
and the block updates the streams as
    x = Σ_i pre_i X_i,   X'_k = post_k · F(norm(x)) + Σ_j comb_jk X_j     (X' = post ⊗ F + combᵀ X).
comb on the Birkhoff polytope keeps the residual mixing non-expansive however deep the stack.
The final HyperHead collapses the streams once more (pre only, no Sinkhorn) before the last norm.

Like DeepSeek's reference (hc_pre / hc_split_sinkhorn / hc_head) the linear runs on the raw
streams and the rms is divided out afterwards; transformers normalises first. The two are equal
up to rounding (linearity). All of it runs in fp32, the parameters too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp onto (nearly) doubly-stochastic matrices, [..., n, n] positive entries in.
    DeepSeek's order: one column normalisation, then iters - 1 rounds of rows then columns
    (so the columns sum to 1 to within eps and the rows to within the last round's residual)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def doubly_stochastic_error(comb: torch.Tensor) -> torch.Tensor:
    """max over the batch of |row sum - 1| and |column sum - 1| of comb [..., n, n]: how far
    the Sinkhorn projection left the mixing from the Birkhoff polytope (a training log)."""
    rows = (comb.sum(dim=-1) - 1).abs().amax()
    cols = (comb.sum(dim=-2) - 1).abs().amax()
    return torch.maximum(rows, cols)


def _flat_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """streams [B,S,n,D] -> (vec(X) fnᵀ) / rms(vec(X)) [B,S,rows of fn], in fp32."""
    flat = streams.flatten(2).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    with torch.autocast(flat.device.type, enabled=False):
        return F.linear(flat, fn.float()) * rsqrt


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x = Σ_i pre_i X_i: [B,S,n,D] with pre [B,S,n] -> [B,S,D] in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams.float()).sum(dim=2).to(streams.dtype)


class HyperConnection(nn.Module):
    """The pre/post/comb mixings around one sub-layer (a block has attn_hc and ffn_hc)."""
    runs_in_fp32 = True  # fp32 parameters in bf16 training too, as DeepSeek keeps them

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = self.hc_mult = cfg.hc_mult
        self.sinkhorn_iters, self.hc_eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))  # α_pre, α_post, α_res
        self.comb_error: torch.Tensor | None = None  # last training forward's, for the logs

    def forward(self, streams: torch.Tensor):
        """streams [B,S,n,D] -> (x [B,S,D] the sub-layer's input, post [B,S,n], comb [B,S,n,n])."""
        n = self.hc_mult
        mixes = _flat_mixes(streams, self.fn, self.norm_eps)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        scale = self.scale.float()
        pre = torch.sigmoid(pre_w * scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
        comb = (comb_w * scale[2] + comb_b).unflatten(-1, (n, n)).softmax(dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        if self.training:
            self.comb_error = doubly_stochastic_error(comb.detach())
        return collapse(streams, pre), post, comb

    @staticmethod
    def expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k · out + Σ_j comb_jk X_j: out [B,S,D], streams [B,S,n,D] -> [B,S,n,D]."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """The last collapse of the streams, before the final norm: x = Σ_i (σ(α p̃_i + b_i) + ε) X_i."""
    runs_in_fp32 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = self.hc_mult = cfg.hc_mult
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B,S,n,D] -> [B,S,D]."""
        mixes = _flat_mixes(streams, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return collapse(streams, pre)
