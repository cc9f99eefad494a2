"""Multi-Token Prediction (DeepSeek-V3 §2.2).

Module k (k = 1..D) sees the representation h^{k-1}_i of token i and the embedding of
token i+k, and predicts token i+k+1:
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])
    h^k_i = Block(h'_i),   logits = lm_head(shared_head.norm(h^k_i))
The embedding and output head are the main model's (shared). h^0 is the main model's
final (normed) hidden state, as vLLM and SGLang feed DeepSeek-V3's MTP layer. In a
checkpoint, module k lives at `model.layers.{num_hidden_layers + k - 1}`; it is a Block
with four extra tensors, so the block's names line up with the HF layout.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.cache import Cache
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    """Only the norm is owned; the projection is the main lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, freqs_cis: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """h_prev [B,S,D] of tokens i, emb_next [B,S,D] of tokens i+k -> h^k [B,S,D]."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, freqs_cis, cache)
