"""The paged latent KV cache and the view that lets the model use it.

MLA needs only c_KV and the shared rope key k_pe per token, so each layer owns one tensor
[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] — 576 numbers per token per
layer for DeepSeek-V3 — and nothing per head. MTP modules get layers of their own
(layer id num_hidden_layers + k). A sequence's tokens live in the blocks its block table
names; block b, offset o holds token b * block_size + o.

DeepSeek-V3.2 (cfg.arch "v32") adds, per token and layer, its lightning indexer's key
k^I_s (index_head_dim numbers; V3.2 eq. 1), in a second tensor per layer
[num_blocks, block_size, index_head_dim] beside the latents. Both are per token, so one
block table and one block id address both: a block is allocated, shared by a prefix-cache
hit, preempted and freed as one, and a cached prefix carries its indexer keys.

`BatchView` implements the model's cache protocol (`nanoseek.model.cache.Cache`) for one
forward over a batch of sequences of different lengths: it writes the new latents (and
indexer keys) into their slots and gathers every sequence's into padded [B, T_max, ...]
tensors, with a [B, S, T_max] mask that encodes causality and padding at once. V3.2's
decode reads less (DeepSeek-V3.2 eq. 2: attention over the top-k S_t only):
`update_index_keys` writes all three but gathers only the indexer keys, and `gather(layer,
idx)` then reads the latents of each query's top-k positions through the block table, so
a decode step moves B·S·k latent rows, not B·T_max.
"""

from __future__ import annotations

import copy
import re

import torch

from nanoseek.config import ModelConfig


def available_memory(device: torch.device) -> int:
    """Free bytes on the device: CUDA's free memory, else MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell available memory: no psutil and no /proc/meminfo")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(spec: str | float | int) -> float:
    """'0.3' -> 0.3 (a fraction), '512MiB' -> 536870912, '2e9' -> 2e9 (bytes)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", spec)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory={spec!r}: expected bytes (e.g. 512MiB, 2e9) or a fraction in (0, 1]")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def budget_bytes(kv_cache_memory: str | float | int, device: torch.device) -> int:
    """A fraction in (0, 1] of the available memory, or a number of bytes (> 1)."""
    value = parse_memory(kv_cache_memory)
    if value <= 0:
        raise ValueError(f"kv_cache_memory={kv_cache_memory!r} must be positive")
    return int(value * available_memory(device)) if value <= 1 else int(value)


def budget_blocks(budget: int, per_block: int, block_size: int, num_layers: int,
                  max_blocks: int | None = None) -> int:
    """How many blocks of `per_block` bytes a budget of `budget` bytes holds (at most
    max_blocks); a budget that holds none is an error naming what one block needs."""
    num_blocks = budget // per_block
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory of {budget} bytes holds no block: one block of "
                         f"{block_size} tokens x {num_layers} layers needs {per_block} bytes")
    return int(num_blocks)


class PagedLatentCache:
    """Per layer, the latents `kv[layer]` [num_blocks, block_size, kv_lora_rank + rope] and,
    for V3.2, the indexer keys `index_k[layer]` [num_blocks, block_size, index_head_dim],
    both in the cache dtype and addressed by the same block ids.

    Why a second tensor per layer rather than one pool with a wider row: the two are read
    differently. V3.2's decode scores *every* cached indexer key but needs the latents of
    only the top-k tokens it picks (V3.2 eq. 2), so the keys must be gatherable without
    dragging the latents along; and DeepSeek serves them in different formats (FlashMLA's
    656-byte FP8 latent, FP8 indexer keys with one scale per 128: calc/kv.py
    `deepseek_dtypes`), which one row cannot hold. A V3 cache is unchanged: `kv` alone."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if cfg.attention_type != "mla":
            raise ValueError(f"the paged latent cache needs MLA; this model has attention_type={cfg.attention_type!r}")
        if cfg.is_v4:
            raise ValueError("the paged latent cache holds one row per token; a DeepSeek-V4 model (arch 'v4') "
                             "keeps sliding windows and compressed entries: page it with engine/v4_cache.py")
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.latent_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.index_dim = self.index_head_dim(cfg)
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        # zeros, not empty: padded gathers read slots nobody wrote, and 0 * NaN would leak.
        self.kv = [torch.zeros(num_blocks, block_size, self.latent_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)]
        self.index_k = [torch.zeros(num_blocks, block_size, self.index_dim, dtype=dtype, device=device)
                        for _ in range(num_layers if self.index_dim else 0)]

    @staticmethod
    def index_head_dim(cfg: ModelConfig) -> int:
        """Numbers of indexer key cached per token and layer: index_head_dim for V3.2, else 0."""
        return cfg.index_head_dim if cfg.is_v32 else 0

    @classmethod
    def bytes_per_token(cls, cfg: ModelConfig, num_layers: int, dtype: torch.dtype) -> int:
        """(kv_lora_rank + qk_rope_head_dim [+ index_head_dim for V3.2]) · layers · bytes(dtype)."""
        row = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cls.index_head_dim(cfg)
        return row * num_layers * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget: int, block_size: int, num_layers: int,
                    dtype: torch.dtype, device, max_blocks: int | None = None) -> "PagedLatentCache":
        per_block = cls.bytes_per_token(cfg, num_layers, dtype) * block_size
        return cls(cfg, budget_blocks(budget, per_block, block_size, num_layers, max_blocks),
                   block_size, num_layers, dtype, device)

    def pack(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """c_KV [B, S, r], k_pe [B, S, rope] -> rows [B, S, r + rope] (the K/V cache's
        `pack` takes an MHA/GQA layer's k and v: engine/kv_cache.py)."""
        return torch.cat([c_kv, k_pe], dim=-1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows [B, T, r + rope] -> c_KV [B, T, r], k_pe [B, T, rope]."""
        return tuple(rows.split([self.kv_lora_rank, self.rope_dim], dim=-1))

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_by_kind().values())

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes allocated per cache kind: "latent" (c_KV + k_pe), and "indexer" for V3.2."""
        out = {"latent": sum(t.numel() * t.element_size() for t in self.kv)}
        if self.index_k:
            out["indexer"] = sum(t.numel() * t.element_size() for t in self.index_k)
        return out

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


class BatchView:
    """The cache protocol over block tables for one forward of B sequences.

    starts[b]: tokens of sequence b already in the cache (its first new position);
    q_lens[b]: new tokens this forward (1..S); rows s >= q_lens[b] are padding. A padding
    row's mask still allows sequence b's real keys, so no row is fully masked (no NaN);
    the runner ignores its output.
    """

    def __init__(self, cache: PagedLatentCache, block_tables: list[list[int]], starts: list[int],
                 q_lens: list[int], absorb: bool):
        self.cache, self.absorb = cache, absorb
        dev = cache.kv[0].device
        bs = cache.block_size
        B, S = len(starts), max(q_lens)
        starts_t = torch.tensor(starts, device=dev)
        q_lens_t = torch.tensor(q_lens, device=dev)
        ends = starts_t + q_lens_t                                  # context length after this forward
        T = int(ends.max())
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=dev, dtype=torch.long)
        s = torch.arange(S, device=dev)
        t = torch.arange(T, device=dev)
        self.positions = starts_t[:, None] + s[None, :]             # [B, S]
        valid_q = s[None, :] < q_lens_t[:, None]                     # [B, S]
        valid_k = t[None, :] < ends[:, None]                         # [B, T]
        # Slots: the flat index block * block_size + offset of every position.
        def slots(pos):  # pos [B, X] -> [B, X]; positions past the table are clamped (padding)
            blk = torch.gather(tables, 1, (pos // bs).clamp(max=width - 1))
            return blk * bs + pos % bs
        # every row real (decode, or chunks of one length): a reshape, not a boolean index
        # (a nonzero and a gather per layer)
        self.valid_q = None if min(q_lens) == S else valid_q
        write = slots(self.positions)
        self.write_slots = write.flatten() if self.valid_q is None else write[valid_q]  # [N_new]
        # a padded key reads the sequence's own first row, never another request's (a NaN
        # there would reach this one through attention's masked 0 * NaN)
        self.read_slots = torch.where(valid_k, slots(t[None, :].expand(B, T)), tables[:, :1] * bs)  # [B, T]
        self.mask = (t[None, None, :] <= self.positions[:, :, None]) & valid_k[:, None, :]  # [B, S, T]
        self.length = None  # positions are explicit; nothing should infer them from the cache

    def keys_from(self, first: list[int]) -> "BatchView":
        """The same forward's view for a layer whose cache is whole only from position
        first[b] of sequence b on (the MTP layer's, engine/spec_policy.py): its queries
        attend to keys first[b].. only. Each query's own position must be >= first[b]."""
        view = copy.copy(self)
        t = torch.arange(self.read_slots.shape[1], device=self.mask.device)
        first_t = torch.tensor(first, device=self.mask.device)
        view.mask = self.mask & (t[None, None, :] >= first_t[:, None, None])
        return view

    def update(self, layer_id: int, c_kv: torch.Tensor, k_pe: torch.Tensor,
               index_k: torch.Tensor | None = None):
        """Write the new tokens' latents (and V3.2's indexer keys index_k [B, S, d_I]), or an
        MHA/GQA layer's (k, v) into a PagedKVCache; return every sequence's cached (c_KV,
        k_pe[, index_k]) or (k, v) [B, T_max, ...] and the mask."""
        self._check_index_k(layer_id, index_k)
        out = self.cache.unpack(self._write_and_gather(self.cache.kv[layer_id], self.cache.pack(c_kv, k_pe)))
        if index_k is not None:
            out = (*out, self._write_and_gather(self.cache.index_k[layer_id], index_k))
        return tuple(out), self.mask

    def update_index_keys(self, layer_id: int, c_kv: torch.Tensor, k_pe: torch.Tensor,
                          index_k: torch.Tensor):
        """V3.2 decode's write (MLA.top_k_latents): like `update`, but reads back only the
        indexer keys ((index_k [B, T_max, d_I],), mask). The indexer scores every key; the
        latents stay in their blocks until `gather` reads the top-k of each query."""
        self._check_index_k(layer_id, index_k)
        self._write(self.cache.kv[layer_id], torch.cat([c_kv, k_pe], dim=-1))
        return (self._write_and_gather(self.cache.index_k[layer_id], index_k),), self.mask

    def gather(self, layer_id: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx [B, S, k] positions in each sequence -> its latents c_KV [B, S, k, r] and
        k_pe [B, S, k, rope], in the cache's dtype, read through the block table: position ->
        slot (`read_slots`), slot -> row of `kv[layer_id]`, so only the k chosen rows of each
        query move (vLLM's sparse MLA likewise turns its top-k positions into slots)."""
        B, S, k = idx.shape
        slots = torch.gather(self.read_slots, 1, idx.reshape(B, S * k))
        flat = self.cache.kv[layer_id].view(-1, self.cache.latent_dim)
        rows = flat.index_select(0, slots.flatten()).view(B, S, k, -1)
        return tuple(rows.split([self.cache.kv_lora_rank, self.cache.rope_dim], dim=-1))

    def _check_index_k(self, layer_id: int, index_k: torch.Tensor | None) -> None:
        if (index_k is None) != (not self.cache.index_k):
            raise ValueError(f"layer {layer_id}: the cache {'holds' if self.cache.index_k else 'has no'} indexer "
                             f"keys but update got {'none' if index_k is None else 'index_k'}: a V3.2 model's "
                             "MLA passes index_k and needs a cache built from its config")

    def _write(self, pool: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """new [B, S, d] -> its real rows into their slots of pool [num_blocks, block_size, d];
        returns the pool as rows [num_blocks * block_size, d]."""
        flat = pool.view(-1, pool.shape[-1])
        rows = new.reshape(-1, new.shape[-1]) if self.valid_q is None else new[self.valid_q]
        flat.index_copy_(0, self.write_slots, rows.to(flat.dtype))
        return flat

    def _write_and_gather(self, pool: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`_write`, then every sequence's rows [B, T_max, d] in new's dtype."""
        flat = self._write(pool, new)
        B, T = self.read_slots.shape
        return flat.index_select(0, self.read_slots.flatten()).view(B, T, -1).to(new.dtype)
