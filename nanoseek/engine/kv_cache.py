"""The paged K/V cache for MHA/GQA/MQA attention: keys and values of every KV head per token.

The dense baselines (model/attention.GQA) — the Llama language model of a DeepSeek-VL, the
MHA DeepSeekMoE of DeepSeek-OCR-2 — attend with per-head keys and values, so each layer
caches k [n_kv_heads, qk_head_dim] and v [n_kv_heads, v_head_dim] per token: GQA/MQA store
only their KV heads, and the query heads of a group share them in attention (SDPA's
enable_gqa). One tensor per layer [num_blocks, block_size, n_kv_heads · (qk_head_dim +
v_head_dim)] holds both, a token's k of every head then its v, so that block tables, prefix
sharing, preemption and the `BatchView` reads and writes are the latent cache's
(engine/cache.py): only `pack` (k, v -> one row per token) and `unpack` (rows -> k, v)
differ. Compare the bytes per token: 2 · n_kv_heads · head_dim here against MLA's
kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


class PagedKVCache:
    """Per layer `kv[layer]` [num_blocks, block_size, n_kv_heads · (qk_head_dim + v_head_dim)]
    in the cache dtype. `index_k` is empty: no indexer keys (the BatchView checks it)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if cfg.attention_type == "mla" or cfg.is_v4:
            raise ValueError(f"the paged K/V cache holds per-head keys and values (attention_type mha/gqa/mqa); "
                             f"this model has attention_type={cfg.attention_type!r}, arch={cfg.arch!r}: "
                             "use the paged latent cache (engine/cache.py) or engine/v4_cache.py")
        self.n_kv_heads, self.k_dim, self.v_dim = cfg.kv_heads, cfg.qk_head_dim, cfg.v_head_dim
        self.row_dim = self.n_kv_heads * (self.k_dim + self.v_dim)
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        # zeros, not empty: padded gathers read slots nobody wrote, and 0 * NaN would leak.
        self.kv = [torch.zeros(num_blocks, block_size, self.row_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)]
        self.index_k: list[torch.Tensor] = []

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, num_layers: int, dtype: torch.dtype) -> int:
        """n_kv_heads · (qk_head_dim + v_head_dim) · layers · bytes(dtype)."""
        row = cfg.kv_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        return row * num_layers * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget: int, block_size: int, num_layers: int,
                    dtype: torch.dtype, device, max_blocks: int | None = None) -> "PagedKVCache":
        from nanoseek.engine.cache import budget_blocks
        per_block = cls.bytes_per_token(cfg, num_layers, dtype) * block_size
        return cls(cfg, budget_blocks(budget, per_block, block_size, num_layers, max_blocks),
                   block_size, num_layers, dtype, device)

    def pack(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k [B, S, n_kv, qk_head_dim], v [B, S, n_kv, v_head_dim] -> rows [B, S, row_dim]."""
        return torch.cat([k.flatten(2), v.flatten(2)], dim=-1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B, T, row_dim] -> k [B, T, n_kv, qk_head_dim], v [B, T, n_kv, v_head_dim]."""
        B, T, _ = rows.shape
        k, v = rows.split([self.n_kv_heads * self.k_dim, self.n_kv_heads * self.v_dim], dim=-1)
        return k.view(B, T, self.n_kv_heads, self.k_dim), v.view(B, T, self.n_kv_heads, self.v_dim)

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_by_kind().values())

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes allocated per cache kind: "kv" (keys and values of every KV head)."""
        return {"kv": sum(t.numel() * t.element_size() for t in self.kv)}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def paged_cache_class(cfg: ModelConfig):
    """The paged cache for a (non-V4) model's attention: latents for MLA, k/v per KV head otherwise."""
    from nanoseek.engine.cache import PagedLatentCache
    return PagedLatentCache if cfg.attention_type == "mla" else PagedKVCache
