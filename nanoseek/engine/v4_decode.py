"""DeepSeek-V4's batched decode view: one new token for each of B sequences, read from and written to the paged pools.

The per-sequence `SeqView` (engine/v4_cache.py) serves prefill chunks, one sequence per forward.
A decode step instead runs every decoding sequence in one forward: this view hands each layer
a ragged state (the interface model/v4/decode.py reads), gathered through the block tables:

    window rows      positions p_b - n_win + 1 .. p_b - 1 of each row, from the window blocks
    carry            the open window and CSA's overlap half, from the window block of p_b - 1
    entries          every entry (HCA, the indexer's keys) or the top-k (CSA) from the main blocks
and writes back what the token adds: its window row, its slot of the open window, and for the
rows whose window it closes the new entry and overlap half. The carry goes to the window block
of p_b (a new block's first token reads the previous block's carry and files its own).
"""

from __future__ import annotations

import torch

from nanoseek.engine.v4_cache import PagedV4Cache


def _table(tables: list[list[int | None]], device) -> torch.Tensor:
    """Block tables -> a padded [B, W] long tensor (released or missing blocks: 0, never read)."""
    width = max(len(t) for t in tables)
    return torch.tensor([[b or 0 for b in t] + [0] * (width - len(t)) for t in tables], dtype=torch.long,
                        device=device)


def _slots(table: torch.Tensor, index: torch.Tensor, per: int) -> torch.Tensor:
    """Row numbers index [B, X] (>= 0) of each sequence -> flat rows of a pool with per rows a block."""
    block = torch.gather(table, 1, (index // per).clamp(max=table.shape[1] - 1))
    return block * per + index % per


class RaggedCompressor:
    """One compressor's ragged state for the step (see model/v4/decode.py for the interface)."""

    def __init__(self, view: "DecodeView", layer_id: int, name: str):
        cache, pos = view.cache, view.positions
        self.view, self.m = view, cache.rates[layer_id]
        self.parts = cache.carry[layer_id][name]
        self.pool = cache.entries[layer_id] if name == "compressor" else cache.index_k[layer_id]
        self.n_before = pos // self.m
        read = view.carry_read
        self.pending_kv, self.pending_score = self.parts["pending_kv"][read], self.parts["pending_score"][read]
        if "overlap_kv" in self.parts:
            none = (self.n_before == 0)[:, None, None]  # no window closed yet: the -inf of entry 0
            self.overlap_kv = self.parts["overlap_kv"][read].masked_fill(none, 0.0)
            self.overlap_score = self.parts["overlap_score"][read].masked_fill(none, float("-inf"))

    def store(self, pending_kv, pending_score, overlap_kv, overlap_score, closing, entry) -> None:
        write = self.view.carry_write
        self.parts["pending_kv"][write], self.parts["pending_score"][write] = pending_kv, pending_score
        if overlap_kv is not None:
            self.parts["overlap_kv"][write], self.parts["overlap_score"][write] = overlap_kv, overlap_score
        rows = closing.nonzero()[:, 0]
        if len(rows):
            per = self.pool.shape[1]
            slots = _slots(self.view.tables[rows], self.n_before[rows, None], per)[:, 0]
            self.pool.view(-1, self.pool.shape[-1]).index_copy_(0, slots, entry[rows].to(self.pool.dtype))
        self.n_after = self.n_before + closing.long()

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry of each row, [B, N, d] padded, and which are real [B, N]."""
        N = int(self.n_after.max())
        index = torch.arange(N, device=self.pool.device).expand(len(self.n_after), N)
        visible = index < self.n_after[:, None]
        slots = torch.where(visible, _slots(self.view.tables, index, self.pool.shape[1]), 0)
        rows = self.pool.view(-1, self.pool.shape[-1]).index_select(0, slots.flatten())
        return rows.view(*index.shape, self.pool.shape[-1]), visible

    def gather_entries(self, idx: torch.Tensor) -> torch.Tensor:
        B, S, k = idx.shape
        slots = _slots(self.view.tables, idx.reshape(B, S * k), self.pool.shape[1])
        rows = self.pool.view(-1, self.pool.shape[-1]).index_select(0, slots.flatten())
        return rows.view(B, S, k, self.pool.shape[-1])


class RaggedLayer:
    """One layer's ragged state for the step."""
    ragged = True

    def __init__(self, view: "DecodeView", layer_id: int):
        self.view, self.layer_id = view, layer_id
        self.positions = view.positions
        n_win, bs = view.cache.n_win, view.cache.block_size
        back = view.positions[:, None] - torch.arange(n_win - 1, 0, -1, device=view.device)  # [B, n_win - 1]
        self.window_valid = back >= 0
        slots = torch.where(self.window_valid, _slots(view.windows, back.clamp(min=0), bs), 0)
        pool = view.cache.window[layer_id]
        self.window = pool.view(-1, pool.shape[-1]).index_select(0, slots.flatten()).view(*back.shape, -1)
        self.compressors: dict[str, RaggedCompressor] = {}

    def write_window(self, kv: torch.Tensor) -> None:
        pool = self.view.cache.window[self.layer_id]
        slots = _slots(self.view.windows, self.positions[:, None], pool.shape[1])[:, 0]
        pool.view(-1, pool.shape[-1]).index_copy_(0, slots, kv[:, 0].to(pool.dtype))

    def compressor(self, name: str) -> RaggedCompressor:
        if name not in self.compressors:
            self.compressors[name] = RaggedCompressor(self.view, self.layer_id, name)
        return self.compressors[name]


class DecodeView:
    """The cache for one decode step of B sequences (one token each, at `starts`)."""

    def __init__(self, cache: PagedV4Cache, block_tables: list[list[int]],
                 window_tables: list[list[int | None]], starts: list[int]):
        self.cache, self.device = cache, cache.window[0].device
        self.positions = torch.tensor(starts, dtype=torch.long, device=self.device)
        self.tables = _table(block_tables, self.device)
        self.windows = _table(window_tables, self.device)
        bs = cache.block_size
        # the carry as of the previous token, and where this token's goes
        self.carry_read = torch.gather(self.windows, 1, ((self.positions - 1) // bs)[:, None])[:, 0]
        self.carry_write = torch.gather(self.windows, 1, (self.positions // bs)[:, None])[:, 0]
        self.layers: dict[int, RaggedLayer] = {}

    def v4_state(self, layer_id: int) -> RaggedLayer:
        if layer_id not in self.layers:
            self.layers[layer_id] = RaggedLayer(self, layer_id)
        return self.layers[layer_id]
