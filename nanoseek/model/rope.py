"""Rotary position embedding on consecutive pairs, with YaRN context extension.

DeepSeek's released weights rotate pairs (x0, x1), (x2, x3), ... (the `rope_interleave`
layout), so we treat each pair as a complex number and multiply by e^{i·pos·θ_j}, as the
reference `inference/model.py` does. YaRN follows transformers' semantics (the oracle):
when the config says YaRN, the blended frequencies are used at every length and cos/sin
are scaled by the attention factor: `attention_factor` when the config gives it, else
mscale(factor, mscale) / mscale(factor, mscale_all_dim). The softmax scale's mscale² comes
from `mscale_all_dim` alone, whatever `attention_factor` says (as in transformers).
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale² when the config says YaRN."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn and cfg.yarn.get("mscale_all_dim"):
        m = yarn_mscale(cfg.yarn["factor"], cfg.yarn["mscale_all_dim"])
        scale *= m * m
    return scale


def yarn_correction_range(yarn: dict, dim: int, base: float) -> tuple[float, float]:
    """The dims between which YaRN's ramp blends extrapolation into interpolation: where a
    dim turns beta_fast and beta_slow times over the original context. `truncate` (default
    true) rounds the range outwards to whole dims, as the YaRN paper's code does."""
    original_len = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_attention_factor(yarn: dict) -> float:
    """The factor on cos/sin: the config's `attention_factor` overrides the mscale ratio."""
    if yarn.get("attention_factor") is not None:
        return float(yarn["attention_factor"])
    factor, mscale, mscale_all = yarn["factor"], yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    return yarn_mscale(factor)


def inv_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """θ_j for j < dim/2 and the factor that scales cos/sin (1 without YaRN)."""
    base = cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = cfg.yarn
    if not yarn:
        return freqs, 1.0
    low, high = yarn_correction_range(yarn, dim, base)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    # Low-frequency dims (ramp → 1) are interpolated by `factor`; high ones kept.
    freqs = freqs / yarn["factor"] * ramp + freqs * (1 - ramp)
    return freqs, yarn_attention_factor(yarn)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed e^{i·pos·θ} for every position up to max_position_embeddings."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim
        freqs, self.attn_factor = inv_frequencies(cfg, dim)
        self.register_buffer("inv_freq", freqs, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [..., S] (long) -> complex freqs_cis [..., S, dim/2]."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.polar(torch.full_like(angles, self.attn_factor), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, d] rotated pairwise by freqs_cis [B, S, d/2]; dtype kept."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2)
    return out.to(x.dtype)
