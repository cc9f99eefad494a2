"""One pre-norm transformer block: attention, then a dense FFN or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import build_attention
from nanoseek.model.cache import Cache
from nanoseek.model.mlp import MLP
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):  # a padded layout's cache names its real tokens
            return x + self.mlp(h, getattr(cache, "token_mask", None))
        return x + self.mlp(h)
