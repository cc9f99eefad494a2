"""The DeepSeek-V4 decoder stack: embeddings copied into hc_mult streams, the blocks, HyperHead, final norm.

    X^0 = [e, e, ..., e] (n copies of the token embedding),  X^l = Block_l(X^{l-1}),
    h = RMSNorm(HyperHead(X^L))
as DeepSeek's Transformer.forward (embed, repeat over hc_mult, layers, head.hc_head, norm).
`streams` stops before the head: V4's MTP block reads the last layer's streams, not h.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.v4.block import V4Block
from nanoseek.model.v4.hyper_connections import HyperHead


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hc_mult = cfg.hc_mult
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def streams(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids [B,S] -> the last block's residual streams [B,S,hc_mult,D]."""
        e = self.embed_tokens(input_ids)
        x = e.unsqueeze(2).expand(-1, -1, self.hc_mult, -1)
        for layer in self.layers:
            x = layer(x, positions, cache, input_ids)
        return x

    def head(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B,S,n,D] -> h = RMSNorm(HyperHead(streams)) [B,S,D], what lm_head reads."""
        return self.norm(self.hc_head(streams))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids [B,S], positions [B,S] -> normed hidden states [B,S,D] (like the V3 stack)."""
        return self.head(self.streams(input_ids, positions, cache))
