"""One DeepSeek-V4 block: attention and MoE, each wrapped in manifold-constrained hyper-connections.

The residual is hc_mult streams X [B,S,n,D] (hyper_connections.py). Each sub-layer F reads one
collapsed, normed input and writes back through post and comb:
    x, post, comb = attn_hc(X);   X = post ⊗ Attn(norm(x)) + combᵀ X
    x, post, comb = ffn_hc(X);    X = post ⊗ MoE(norm(x), ids) + combᵀ X
(DeepSeek's Block.forward: hc_pre, attn_norm, attn, hc_post; then the same for the FFN.)
Every V4 layer's FFN is an MoE; the first ones route by token id, so the block takes input_ids.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.v4.attention import V4Attention
from nanoseek.model.v4.hyper_connections import HyperConnection


class V4Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = V4Attention(cfg, layer_id)
        self.mlp = MoE(cfg, layer_id)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, cache=None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """streams [B,S,n,D], positions [B,S], input_ids [B,S] -> streams [B,S,n,D]."""
        x, post, comb = self.attn_hc(streams)
        out = self.self_attn(self.input_layernorm(x), positions, cache)
        streams = self.attn_hc.expand(out, streams, post, comb)
        x, post, comb = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(x), getattr(cache, "token_mask", None), input_ids)
        return self.ffn_hc.expand(out, streams, post, comb)
