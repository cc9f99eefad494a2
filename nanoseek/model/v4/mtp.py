"""DeepSeek-V4's multi-token prediction block: a full V4 block fed the previous depth's streams and the next token.

Depth k (k = 1..D) sees the residual streams X^{k-1}_i of token i (the main model's last block's
streams for k = 1, before its HyperHead) and the embedding of token i+k, and predicts token i+k+1:
    X'_i = h_proj(hnorm(X^{k-1}_i)) + e_proj(enorm(Emb(t_{i+k})))   (the embedding term added to every stream)
    X^k_i = V4Block(X'_i),   logits = lm_head(norm(HyperHead_k(X^k_i)))
as DeepSeek's reference MTPBlock (inference/model.py): e_proj, h_proj, enorm, hnorm, norm and its
own hc_head (hc_head_fn/base/scale there, hc_head.hc_fn/hc_base/hc_scale here); the embedding and
lm_head are the main model's. hnorm normalises each stream over D. The block's attention is
cfg.mtp_layer_type (DeepSeek's compress_ratios has one extra entry for it) and its MoE learns its
routing (hash layers are main layers only). transformers does not build this block.
V3's MTP (model/mtp.py) instead concatenates [enorm(e); hnorm(h)] into one eh_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.v4.block import V4Block
from nanoseek.model.v4.hyper_connections import HyperHead


class MTPBlock(V4Block):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        dim = cfg.hidden_size
        self.e_proj = nn.Linear(dim, dim, bias=False)
        self.h_proj = nn.Linear(dim, dim, bias=False)
        self.enorm = RMSNorm(dim, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(dim, cfg.rms_norm_eps)
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)

    def forward(self, streams: torch.Tensor, emb_next: torch.Tensor, positions: torch.Tensor,
                cache=None, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """streams [B,S,n,D] of tokens i, emb_next [B,S,D] of tokens i+k (next_ids [B,S]),
        positions [B,S] of tokens i -> this depth's streams X^k [B,S,n,D]."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(emb_next)).unsqueeze(2)
        return super().forward(x, positions, cache, next_ids)

    def head(self, streams: torch.Tensor) -> torch.Tensor:
        """X^k [B,S,n,D] -> norm(HyperHead_k(X^k)) [B,S,D], what the shared lm_head reads."""
        return self.norm(self.hc_head(streams))
