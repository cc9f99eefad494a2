"""DeepEncoder V2, DeepSeek-OCR-2's vision encoder: SAM ViT-B and its 16x token compressor, then
a small LLM-style encoder that reads the visual tokens with learnable "causal flow" queries.

The optical compression (DeepSeek-OCR §3.2, DeepSeek-OCR-2 §3):
  1. SAM ViT-B (windowed attention, a few global layers) embeds 16x16-pixel patches; its neck
     and two stride-2 convolutions (the 16x token compressor) leave one visual token per 64x64
     pixels: 256 for the 1024-pixel global view, 144 for a 768-pixel tile.
  2. The visual tokens are followed by as many learnable queries (144 for a tile, 256 for the
     global view) and both pass through a Qwen2-style decoder whose attention mask is hybrid:
     visual tokens see each other bidirectionally (a ViT over the compressed tokens); the
     queries see every visual token and, causally, the queries before them. Only the query
     outputs leave the encoder: they carry the image to the language model in a causal order
     that the encoder learned, not the raster order of the patches.
The SAM encoder and the decoder layers are transformers' modules (a library piece); the
queries, the hybrid mask and the read-out are written here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
    DeepseekOcr2SamVisionConfig,
    DeepseekOcr2VisionEncoderConfig,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamVisionEncoder,
    DeepseekOcr2VisionEncoderLayer,
    DeepseekOcr2VisionRMSNorm,
    DeepseekOcr2VisionRotaryEmbedding,
)

TILE_QUERIES = 144  # 12x12: a 768-pixel tile after the 16x compressor
GLOBAL_QUERIES = 256  # 16x16: the 1024-pixel global view


def hybrid_mask(n_visual: int, n_queries: int, device=None) -> torch.Tensor:
    """[S, S] bool (True = may attend), S = n_visual + n_queries: bidirectional among the
    visual tokens, causal for the queries (every visual token and the queries up to their own)."""
    S = n_visual + n_queries
    allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    allowed[:n_visual, :n_visual] = True
    return allowed


class CausalFlowEncoder(nn.Module):
    """The LLM-style half of DeepEncoder V2: visual tokens + learnable queries -> query outputs."""

    def __init__(self, config: DeepseekOcr2VisionEncoderConfig):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(DeepseekOcr2VisionEncoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = DeepseekOcr2VisionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekOcr2VisionRotaryEmbedding(config)
        self.query_768 = nn.Embedding(TILE_QUERIES, config.hidden_size)
        self.query_1024 = nn.Embedding(GLOBAL_QUERIES, config.hidden_size)

    def queries_for(self, n_visual: int) -> torch.Tensor:
        """The query set of the view's resolution: the tile's up to 144 visual tokens, else the
        global view's (as DeepSeek's code chooses them)."""
        return (self.query_768 if n_visual <= TILE_QUERIES else self.query_1024).weight

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """visual [B, N, D] (the compressed SAM tokens) -> query outputs [B, Q, D]."""
        B, N, _ = visual.shape
        queries = self.queries_for(N).unsqueeze(0).expand(B, -1, -1)
        x = torch.cat([visual, queries.to(visual.dtype)], dim=1)
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        rope = self.rotary_emb(x, positions)
        mask = hybrid_mask(N, queries.shape[1], x.device)[None, None]
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        return self.norm(x)[:, N:]


class DeepEncoderV2(nn.Module):
    """pixels [B, 3, H, W] of one resolution -> vision tokens [B, Q, D] (before the projector)."""

    def __init__(self, sam: dict, encoder: dict):
        super().__init__()
        sam_config = DeepseekOcr2SamVisionConfig.from_dict(sam)
        sam_config._attn_implementation = "sdpa"
        self.sam_encoder = DeepseekOcr2SamVisionEncoder(sam_config)
        self.encoder = CausalFlowEncoder(DeepseekOcr2VisionEncoderConfig.from_dict(encoder))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.sam_encoder(pixel_values).last_hidden_state  # [B, D, H/64, W/64]
        visual = grid.flatten(2).transpose(1, 2)  # raster order, as the encoder expects
        return self.encoder(visual)
