"""DeepSeek-V4's batched decode view: a token (and its MTP draft) for each of B sequences, read from and written to the paged pools.

The per-sequence `SeqView` (engine/v4_cache.py) serves prefill chunks, one sequence per forward.
A decode step instead runs every decoding sequence in one forward: this view hands each layer
a ragged state (the interface model/v4/decode.py reads), gathered through the block tables:

    window rows      positions p_b - n_win + 1 .. p_b - 1 of each row, from the window blocks
    carry            the open window and CSA's overlap half, from the window block of p_b - 1
    entries          every entry (HCA, the indexer's keys) or the top-k (CSA) from the main blocks
A row's tokens (the pending one, then an MTP draft when there is one: `q_lens`) go one after
another; the state carries each token's window row and compressor carry to the next in memory.
Window rows and new entries are written to the pools as they are made (a rejected draft's land
past the sequence's computed tokens, where the next step rewrites them). The carry is written
only by `commit(keep)`, once the step knows how many of each row's tokens it keeps: the carry
after the last kept token goes to the window block of that token, so a rejected draft leaves
no trace in the state the next step reads.

`keys_from(first)` is the view for the MTP block (a sliding-window layer): its window rows
before first[b] are not read, as the MTP layer's cache is whole only from there
(engine/spec_policy.py).
"""

from __future__ import annotations

import copy

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


def _flat(pool: torch.Tensor) -> torch.Tensor:
    return pool.view(-1, pool.shape[-1])


class RaggedCompressor:
    """One compressor's ragged state (see model/v4/decode.py for the interface): the carry in
    memory, advanced token by token, and its value after each token for `commit`."""

    def __init__(self, layer: "RaggedLayer", name: str):
        view = layer.view
        self.layer, self.m = layer, view.cache.rates[layer.layer_id]
        self.parts = view.cache.carry[layer.layer_id][name]
        self.pool = view.cache.entries[layer.layer_id] if name == "compressor" else view.cache.index_k[layer.layer_id]
        read = view.carry_block(view.starts - 1)
        self.pending_kv, self.pending_score = self.parts["pending_kv"][read], self.parts["pending_score"][read]
        self.n = view.starts // self.m  # entries closed before the row's current token
        if "overlap_kv" in self.parts:
            none = (self.n == 0)[:, None, None]  # no window closed yet: entry 0's window -1 weighs 0
            self.overlap_kv = self.parts["overlap_kv"][read].masked_fill(none, 0.0)
            self.overlap_score = self.parts["overlap_score"][read].masked_fill(none, float("-inf"))
        self.history: list[dict[str, torch.Tensor]] = []

    def store(self, pending_kv, pending_score, overlap_kv, overlap_score, closing, entry) -> None:
        """Keep the carry after the current token, and file the new entry of the rows whose
        window it closed (real tokens only: a padding row changes nothing)."""
        real = self.layer.real
        closing = closing & real
        rows = closing.nonzero()[:, 0]
        if len(rows):
            slots = _slots(self.layer.view.tables[rows], self.n[rows, None], self.pool.shape[1])[:, 0]
            _flat(self.pool).index_copy_(0, slots, entry[rows].to(self.pool.dtype))
        self.n = self.n + closing.long()
        self.pending_kv, self.pending_score = pending_kv, pending_score
        carry = {"pending_kv": pending_kv, "pending_score": pending_score}
        if overlap_kv is not None:
            self.overlap_kv, self.overlap_score = overlap_kv, overlap_score
            carry.update(overlap_kv=overlap_kv, overlap_score=overlap_score)
        self.history.append(carry)

    def commit(self, keep: torch.Tensor) -> None:
        """Write the carry after each row's keep[b]-th token to that token's window block."""
        view, rows = self.layer.view, torch.arange(len(keep), device=keep.device)
        block = view.carry_block(view.starts + keep - 1)
        for part, pool in self.parts.items():
            pool[block] = torch.stack([h[part] for h in self.history], dim=1)[rows, keep - 1]

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry each row's current token may read, [B, N, d] padded, and which are real."""
        N = int(self.n.max())
        index = torch.arange(N, device=self.pool.device).expand(len(self.n), N)
        visible = index < self.n[:, None]
        slots = torch.where(visible, _slots(self.layer.view.tables, index, self.pool.shape[1]), 0)
        return _flat(self.pool).index_select(0, slots.flatten()).view(*index.shape, self.pool.shape[-1]), visible

    def gather_entries(self, idx: torch.Tensor) -> torch.Tensor:
        B, S, k = idx.shape
        slots = _slots(self.layer.view.tables, idx.reshape(B, S * k), self.pool.shape[1])
        return _flat(self.pool).index_select(0, slots.flatten()).view(B, S, k, self.pool.shape[-1])


class RaggedLayer:
    """One layer's ragged state for the step; `at(s)` moves it to each row's s-th token."""
    ragged = True

    def __init__(self, view: "DecodeView", layer_id: int, first: torch.Tensor | None):
        self.view, self.layer_id = view, layer_id
        n_win, bs = view.cache.n_win, view.cache.block_size
        back = view.starts[:, None] - torch.arange(n_win - 1, 0, -1, device=view.device)  # [B, n_win - 1]
        self.window_valid = back >= (0 if first is None else first[:, None])
        slots = torch.where(self.window_valid, _slots(view.windows, back.clamp(min=0), bs), 0)
        pool = view.cache.window[layer_id]
        self.window = _flat(pool).index_select(0, slots.flatten()).view(*back.shape, -1)
        self.compressors: dict[str, RaggedCompressor] = {}
        self.s = -1

    def at(self, s: int) -> "RaggedLayer":
        """Move to each row's s-th new token: the previous token's row joins the window."""
        if s != self.s + 1:
            raise RuntimeError(f"layer {self.layer_id}: tokens must come in order, got {s} after {self.s}")
        if s > 0:
            self.window = torch.cat([self.window[:, 1:], self.last_row], dim=1)
            self.window_valid = torch.cat([self.window_valid[:, 1:], self.window_valid.new_ones(len(self.real), 1)], 1)
        self.s = s
        self.positions = self.view.starts + s
        self.real = self.view.q_lens > s
        return self

    def write_window(self, kv: torch.Tensor) -> None:
        self.last_row = kv
        pool = self.view.cache.window[self.layer_id]
        rows = self.real.nonzero()[:, 0]
        slots = _slots(self.view.windows[rows], self.positions[rows, None], pool.shape[1])[:, 0]
        _flat(pool).index_copy_(0, slots, kv[rows, 0].to(pool.dtype))

    def compressor(self, name: str) -> RaggedCompressor:
        if name not in self.compressors:
            self.compressors[name] = RaggedCompressor(self, name)
        return self.compressors[name]


class DecodeView:
    """The cache for one decode step of B sequences: q_lens[b] tokens (1, or 2 with a draft)
    from position starts[b]; the model reads `positions` [B, S]."""

    def __init__(self, cache: PagedV4Cache, block_tables: list[list[int]],
                 window_tables: list[list[int | None]], starts: list[int], q_lens: list[int]):
        self.cache, self.device = cache, cache.window[0].device
        self.starts = torch.tensor(starts, dtype=torch.long, device=self.device)
        self.q_lens = torch.tensor(q_lens, dtype=torch.long, device=self.device)
        self.positions = self.starts[:, None] + torch.arange(max(q_lens), device=self.device)
        self.tables = _table(block_tables, self.device)
        self.windows = _table(window_tables, self.device)
        self.first: torch.Tensor | None = None
        self.layers: dict[int, RaggedLayer] = {}

    def carry_block(self, pos: torch.Tensor) -> torch.Tensor:
        """The window block of each row's position pos[b] (where the carry after it is filed)."""
        return torch.gather(self.windows, 1, (pos.clamp(min=0) // self.cache.block_size)[:, None])[:, 0]

    def v4_state(self, layer_id: int) -> RaggedLayer:
        if layer_id not in self.layers:
            self.layers[layer_id] = RaggedLayer(self, layer_id, self.first)
        return self.layers[layer_id]

    def keys_from(self, first: list[int]) -> "DecodeView":
        """The view for the MTP block, whose window rows before first[b] are not read."""
        view = copy.copy(self)
        view.first = torch.tensor(first, dtype=torch.long, device=self.device)
        return view

    def commit(self, keep: list[int]) -> None:
        """File every compressor's carry after each row's keep[b]-th token (1 <= keep[b] <= q_lens[b])."""
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.layers.values():
            for c in layer.compressors.values():
                c.commit(keep_t)
