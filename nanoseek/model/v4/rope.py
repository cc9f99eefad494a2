"""V4's two rotary embeddings on the last qk_rope_head_dim dims of a head, and the inverse rotation.

V4 rotates only the trailing `qk_rope_head_dim` channels of each 512-wide head ([nope | rope],
DeepSeek's `x[..., -rd:]`), in consecutive pairs as V3 does (the report's partial RoPE, §2.3).
There are two tables (DeepSeek's reference builds `freqs_cis` per layer):
  * "main":     θ_j = rope_theta^(-2j/d), no YaRN. The sliding-window-only layers use it.
  * "compress": θ_j = compress_rope_theta^(-2j/d), blended by YaRN when the config says so,
                with cos/sin left unscaled (attention_factor 1.0: the reference multiplies by
                e^{iφ} of modulus one). CSA/HCA layers, their compressors and the indexer use it.

Because K = V, the attention output carries the keys' rotation on its rope slice; rotating it
back by the query's position (o ← o · e^{-i·t·θ}) leaves only the relative distance.

The frequencies are recomputed from positions on every call (dim/2 numbers): no buffer, so a
model built on the meta device needs nothing re-materialised.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import inv_frequencies


class V4Rotary(nn.Module):
    """e^{i·pos·θ} for one of V4's two rope tables ("main" or "compress")."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        if kind not in ("main", "compress"):
            raise ValueError(f"V4 rope kind must be 'main' or 'compress', got {kind!r}")
        self.kind, self.dim = kind, cfg.qk_rope_head_dim
        # inv_frequencies reads only `rope_theta` and `yarn`; its cos/sin factor is dropped
        # (V4 keeps attention_factor 1.0 on the compressed layers).
        if kind == "main":
            self.table = SimpleNamespace(rope_theta=cfg.rope_theta, yarn=None)
        else:
            self.table = SimpleNamespace(rope_theta=cfg.compress_rope_theta, yarn=cfg.yarn)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [...] (long) -> complex freqs_cis [..., dim/2]."""
        inv_freq, _ = inv_frequencies(self.table, self.dim)
        angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
        return torch.polar(torch.ones_like(angles), angles)


def rope_tail(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2·freqs_cis.shape[-1] channels of x [B, S, H, d] by freqs_cis [B, S, r/2]
    (the conjugate when inverse), pairs (x0, x1), (x2, x3), ...; the rest passes unchanged."""
    rd = 2 * freqs_cis.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    if inverse:
        freqs_cis = freqs_cis.conj()
    rc = torch.view_as_complex(rope.float().reshape(*rope.shape[:-1], rd // 2, 2))
    rope = torch.view_as_real(rc * freqs_cis.unsqueeze(-2)).flatten(-2).to(x.dtype)
    return torch.cat([nope, rope], dim=-1)
