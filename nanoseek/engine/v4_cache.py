"""DeepSeek-V4's paged cache: window rows, compressed entries, CSA's indexer keys and the compressors' carry, each kind in its own pool.

What each layer keeps (V4 report §2.3; model/v4/cache.py has the same state unpaged):
    kind               per                    layers      pool                          block space
    "window"           token: K=V, head_dim   every one   window[l]  [W, bs, d]          window
    "compressed"       m (CSA) / m' (HCA)     CSA, HCA    entries[l] [N, bs/m, d]        main
                       tokens: one entry
    "indexer"          m tokens: one key      CSA         index_k[l] [N, bs/m, c]        main
    "compressor_state" the open window and    CSA, HCA    carry[l][name][part] [W, ...]  window
                       CSA's overlap half                 (fp32, as DeepSeek keeps it)
Main blocks hold block_size tokens' worth of entries and live as long as the request; window
blocks hold block_size tokens' rows and the compressors' carry as of the block's last computed
token, and are released once the window slides past them (engine/v4_blocks.py). block_size is a
multiple of every compression rate, so a block ends on every compressor's window boundary and
a full block's carry is just CSA's overlap half (the open windows are empty there).

`SeqView` is the model's cache for one sequence's forward (batch of one): it implements the
`v4_state(layer_id)` hook of model/v4/cache.py with states whose tensors come from the pools:
the last n_win - 1 window rows, the carry filed with the block of the last computed token, and
the compressed entries, read only when the layer reads all of them (HCA, the indexer's scores)
or, for CSA's sparse decode, only the top-k it picked (`gather_entries`). What the forward adds
is written straight back: window rows and entries as they are made, the carry by `commit()`.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig
from nanoseek.config.model_config import CSA, HCA
from nanoseek.model.v4.cache import CompressorState, V4LayerState

KINDS = ("window", "compressed", "indexer", "compressor_state")


def compress_rates(cfg: ModelConfig, num_layers: int | None = None) -> list[int]:
    """The compression rates of the layers the cache serves (0 for a sliding layer): the main
    layers, and the MTP block's past them (cfg.layer_type)."""
    return [cfg.compress_rate(cfg.layer_type(i)) for i in range(num_layers or cfg.num_hidden_layers)]


def aligned_block_size(cfg: ModelConfig, block_size: int) -> int:
    """The smallest multiple of block_size that every compression rate divides: then a block
    boundary is a window boundary of every compressor (prefix hits carry no open window)."""
    step = 1
    for m in compress_rates(cfg):
        if m:
            step = math.lcm(step, m)
    return -(-block_size // step) * step


def _carry_shapes(cfg: ModelConfig, layer_id: int) -> dict[str, dict[str, tuple[int, int]]]:
    """Per compressor of the layer, the carry tensors' [rows, width] in a window block."""
    kind = cfg.layer_type(layer_id)
    d, c, m = cfg.head_dim, cfg.index_head_dim, cfg.compress_rate(kind)
    if kind == HCA:
        return {"compressor": {"pending_kv": (m, d), "pending_score": (m, d)}}
    if kind == CSA:
        def csa(w):
            return {"pending_kv": (m, 2 * w), "pending_score": (m, 2 * w), "overlap_kv": (m, w), "overlap_score": (m, w)}
        return {"compressor": csa(d), "indexer": csa(c)}
    return {}


class PagedV4Cache:
    """The pools of every layer of a V4 model the engine runs (the main layers, and the MTP
    block when it speculates: num_layers), by kind; see the module docstring."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, num_window_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", num_layers: int | None = None):
        if not cfg.is_v4:
            raise ValueError(f"PagedV4Cache serves DeepSeek-V4 (arch 'v4'), not arch {cfg.arch!r}")
        if aligned_block_size(cfg, block_size) != block_size:
            raise ValueError(f"block_size={block_size} must be a multiple of every compression rate "
                             f"({sorted(set(m for m in compress_rates(cfg) if m))}) so blocks end on window boundaries")
        self.cfg, self.block_size, self.n_win = cfg, block_size, cfg.sliding_window
        self.num_blocks, self.num_window_blocks = num_blocks, num_window_blocks
        z = dict(dtype=dtype, device=device)
        self.window, self.entries, self.index_k, self.carry, self.rates = [], {}, {}, {}, {}
        for i, m in enumerate(compress_rates(cfg, num_layers)):
            self.window.append(torch.zeros(num_window_blocks, block_size, cfg.head_dim, **z))
            if m:
                self.rates[i] = m
                self.entries[i] = torch.zeros(num_blocks, block_size // m, cfg.head_dim, **z)
                self.carry[i] = {name: {part: torch.zeros(num_window_blocks, *shape, dtype=torch.float32, device=device)
                                        for part, shape in parts.items()}
                                 for name, parts in _carry_shapes(cfg, i).items()}
            if cfg.layer_type(i) == CSA:
                self.index_k[i] = torch.zeros(num_blocks, block_size // m, cfg.index_head_dim, **z)

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None) -> dict[str, int]:
        """Bytes of one block by kind: "compressed" and "indexer" per main block, "window" and
        "compressor_state" per window block."""
        el = torch.empty((), dtype=dtype).element_size()
        out = dict.fromkeys(KINDS, 0)
        for i, m in enumerate(compress_rates(cfg, num_layers)):
            out["window"] += block_size * cfg.head_dim * el
            if m:
                out["compressed"] += block_size // m * cfg.head_dim * el
                out["compressor_state"] += 4 * sum(r * w for parts in _carry_shapes(cfg, i).values()
                                                   for r, w in parts.values())
            if cfg.layer_type(i) == CSA:
                out["indexer"] += block_size // m * cfg.index_head_dim * el
        return out

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget: int, block_size: int, num_window_blocks: int,
                    dtype: torch.dtype, device, max_blocks: int | None = None,
                    num_layers: int | None = None) -> "PagedV4Cache":
        """The window space first (its size is fixed by the schedule's limits), the rest of the
        budget in main blocks."""
        per = cls.block_bytes(cfg, block_size, dtype, num_layers)
        window_bytes = num_window_blocks * (per["window"] + per["compressor_state"])
        main = per["compressed"] + per["indexer"]
        num_blocks = (budget - window_bytes) // main if main else max_blocks or 1
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no block: the window space "
                             f"({num_window_blocks} blocks of {block_size} tokens) takes {window_bytes} bytes "
                             f"and one block of compressed entries {main} more")
        return cls(cfg, int(num_blocks), num_window_blocks, block_size, dtype, device, num_layers)

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes allocated per kind."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        return {"window": size(self.window), "compressed": size(self.entries.values()),
                "indexer": size(self.index_k.values()),
                "compressor_state": size(t for parts in self.carry.values() for d in parts.values() for t in d.values())}

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_by_kind().values())

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def _rows(pool: torch.Tensor, table: list[int | None], first: int, count: int) -> torch.Tensor:
    """Rows first .. first + count - 1 of a sequence in pool [blocks, per_block, d] through
    its block table -> [1, count, d]."""
    per = pool.shape[1]
    idx = torch.arange(first, first + count)
    blocks = torch.tensor([table[b] for b in (idx // per).tolist()], dtype=torch.long)
    return pool.view(-1, pool.shape[-1]).index_select(0, (blocks * per + idx % per).to(pool.device))[None]


def _slots(pool: torch.Tensor, table: list[int | None], first: int, count: int) -> torch.Tensor:
    per = pool.shape[1]
    idx = torch.arange(first, first + count)
    blocks = torch.tensor([table[b] for b in (idx // per).tolist()], dtype=torch.long)
    return (blocks * per + idx % per).to(pool.device)


def _write(pool: torch.Tensor, table: list[int | None], first: int, rows: torch.Tensor) -> None:
    """rows [1, n, d] -> the sequence's rows first .. first + n - 1 of pool."""
    if rows.shape[1]:
        pool.view(-1, pool.shape[-1]).index_copy_(0, _slots(pool, table, first, rows.shape[1]),
                                                  rows[0].to(pool.dtype))


class PagedCompressorState(CompressorState):
    """A compressor's state whose entries live in a pool: read all of them only on demand,
    written as they are made, and gathered by number for CSA's sparse decode."""

    def __init__(self, pool: torch.Tensor, table: list[int], n_entries: int, **carry):
        super().__init__(**carry)
        self.pool, self.table, self._n = pool, table, n_entries
        self.closed: tuple[torch.Tensor, torch.Tensor] | None = None  # this call's C^a halves

    @property
    def entries(self) -> torch.Tensor | None:
        if self._all is None and self._n:
            self._all = _rows(self.pool, self.table, 0, self._n)
        return self._all

    @entries.setter
    def entries(self, value) -> None:
        self._all = value

    @property
    def n_entries(self) -> int:
        return self._n

    def append_entries(self, new: torch.Tensor) -> None:
        """Write new [1, n, d] to the pool; the entries are read back only if asked for."""
        _write(self.pool, self.table, self._n, new)
        if self._all is not None or self._n == 0:
            self._all = new if self._all is None else torch.cat([self._all, new], dim=1)
        self._n += new.shape[1]

    def set_overlap(self, kv_a: torch.Tensor, score_a: torch.Tensor) -> None:
        self.closed = (kv_a, score_a)
        super().set_overlap(kv_a, score_a)

    def gather_entries(self, idx: torch.Tensor) -> torch.Tensor:
        B, S, k = idx.shape
        per = self.pool.shape[1]
        table = torch.tensor(self.table, dtype=torch.long, device=idx.device)
        slots = table[idx // per] * per + idx % per
        flat = self.pool.view(-1, self.pool.shape[-1])
        return flat.index_select(0, slots.flatten()).view(B, S, k, -1)


class PagedLayerState(V4LayerState):
    """A layer's state for one forward of one sequence, over the pools; `keep_window` writes
    the new tokens' window rows as the layer makes them."""

    def __init__(self, view: "SeqView", layer_id: int):
        c, start, n_win = view.cache, view.start, view.cache.n_win
        lo = max(0, start - (n_win - 1))
        super().__init__(length=start, window=_rows(c.window[layer_id], view.window_table, lo, start - lo)
                         if start > lo else None)
        self.view, self.layer_id = view, layer_id
        m = c.rates.get(layer_id, 0)
        carry_block = view.window_table[(start - 1) // c.block_size] if start else None
        for name, parts in c.carry.get(layer_id, {}).items():
            pool = c.entries[layer_id] if name == "compressor" else c.index_k[layer_id]
            kw = {}
            if start % m:
                kw["pending_kv"] = parts["pending_kv"][carry_block, :start % m][None]
                kw["pending_score"] = parts["pending_score"][carry_block, :start % m][None]
            if "overlap_kv" in parts and start >= m:
                kw["overlap_kv"] = parts["overlap_kv"][carry_block][None]
                kw["overlap_score"] = parts["overlap_score"][carry_block][None]
            self.compressors[name] = PagedCompressorState(pool, view.block_table, start // m, **kw)

    def keep_window(self, keys: torch.Tensor, window: int) -> None:
        S = keys.shape[1] - (0 if self.window is None else self.window.shape[1])
        _write(self.view.cache.window[self.layer_id], self.view.window_table, self.view.start, keys[:, -S:])
        super().keep_window(keys, window)

    def commit(self) -> None:
        """File the compressors' carry with the window block of the last computed token, and
        CSA's overlap half with every window block this forward completed."""
        c, view = self.view.cache, self.view
        bs, start, end = c.block_size, view.start, view.end
        m = c.rates.get(self.layer_id, 0)
        if not m:
            return
        last = view.window_table[(end - 1) // bs]
        for name, state in self.compressors.items():
            parts = c.carry[self.layer_id][name]
            r = end % m
            if r:
                parts["pending_kv"][last, :r] = state.pending_kv[0]
                parts["pending_score"][last, :r] = state.pending_score[0]
            if "overlap_kv" not in parts or state.overlap_kv is None:
                continue
            if state.closed is not None:
                kv_a, score_a = state.closed  # the C^a of windows start // m ... end // m - 1
                for b in range(start // bs, end // bs):  # blocks whose end this forward reached
                    j = (b + 1) * bs // m - 1 - start // m
                    parts["overlap_kv"][view.window_table[b]] = kv_a[0, j]
                    parts["overlap_score"][view.window_table[b]] = score_a[0, j]
            parts["overlap_kv"][last] = state.overlap_kv[0]
            parts["overlap_score"][last] = state.overlap_score[0]


class SeqView:
    """The cache for one forward of one sequence (batch of one): tokens start .. end - 1."""

    def __init__(self, cache: PagedV4Cache, block_table: list[int], window_table: list[int | None],
                 start: int, num_new: int):
        self.cache, self.block_table, self.window_table = cache, block_table, window_table
        self.start, self.end = start, start + num_new
        self.absorb = True
        self.states: dict[int, PagedLayerState] = {}

    def v4_state(self, layer_id: int) -> PagedLayerState:
        if layer_id not in self.states:
            self.states[layer_id] = PagedLayerState(self, layer_id)
        return self.states[layer_id]

    def commit(self) -> None:
        for state in self.states.values():
            state.commit()
