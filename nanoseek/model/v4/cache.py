"""What a V4 attention layer keeps between calls: the sliding window, the compressors' open windows and overlap, the compressed entries.

A V4 layer does not fit ContiguousCache's "append this token's tensors" protocol: its sliding
branch keeps only the last n_win - 1 tokens' K=V (the next query's window), and each
compressor keeps
  * the projected tokens of the window not yet closed (fewer than m of them: `pending_*`),
  * for CSA's overlapping windows, the Ca half of the last closed window (`overlap_*`), which
    the next entry pools together with its own Cb half (report §2.3.1),
  * the compressed entries emitted so far (`entries`): one per m tokens, attended by every
    later query (HCA) or offered to the indexer's top-k (CSA).
A CSA layer has two compressors: the attention's (head_dim) and the indexer's (index_head_dim).

`layer_state(cache, layer_id)` hands a layer its state. A cache may provide the hook itself
(`cache.v4_state(layer_id)`); a plain `ContiguousCache` gets the states attached on first use
and its `lengths` advanced, so `cache.length` (the next position) and `CausalLM.generate` work
unchanged. `PaddedRows` stores nothing, so a V4 layer under it runs the stateless full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.model.cache import ContiguousCache, PaddedRows


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


@dataclass
class CompressorState:
    """One compressor's carry (tensors [B, ...]; None until first written)."""
    pending_kv: torch.Tensor | None = None  # [B, r < m, coff·d] tokens of the open window
    pending_score: torch.Tensor | None = None  # [B, r, coff·d] their gate logits (no bias yet)
    overlap_kv: torch.Tensor | None = None  # [B, m, d] CSA: Ca half of the last closed window
    overlap_score: torch.Tensor | None = None  # [B, m, d] its gate logits + position bias
    entries: torch.Tensor | None = None  # [B, N, d] compressed entries so far

    @property
    def n_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[1]

    def append_entries(self, new: torch.Tensor) -> torch.Tensor:
        """Keep new entries [B, n, d]; return every entry so far [B, N, d]."""
        if new.shape[1] or self.entries is None:  # no copy of every entry on a call that closes none
            self.entries = _cat(self.entries, new)
        return self.entries

    def set_overlap(self, kv_a: torch.Tensor, score_a: torch.Tensor) -> None:
        """CSA: the C^a halves [B, n, m, d] (and their gate logits + bias) of the windows this
        call closed, in order; the next entry pools the last one. The engine's paged state
        (engine/v4_cache.py) also files each block's last one with that block."""
        self.overlap_kv, self.overlap_score = kv_a[:, -1].clone(), score_a[:, -1].clone()

    def gather_entries(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, S, k] entry numbers -> those entries [B, S, k, d] (CSA's sparse decode reads
        only the indexer's top-k; a paged cache reads them through its block table)."""
        B, S, k = idx.shape
        rows = torch.gather(self.entries, 1, idx.reshape(B, S * k, 1).expand(-1, -1, self.entries.shape[-1]))
        return rows.view(B, S, k, -1)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pending_kv, self.pending_score, self.overlap_kv,
                            self.overlap_score, self.entries) if t is not None]


@dataclass
class V4LayerState:
    """One V4 attention layer's state: tokens seen, the last n_win - 1 tokens' K=V (rotated),
    and its compressors' states by name ("compressor", "indexer")."""
    length: int = 0
    window: torch.Tensor | None = None  # [B, <= n_win - 1, head_dim]
    compressors: dict[str, CompressorState] = field(default_factory=dict)

    def compressor(self, name: str) -> CompressorState:
        return self.compressors.setdefault(name, CompressorState())

    def keep_window(self, keys: torch.Tensor, window: int) -> None:
        """Keep the last window - 1 of keys [B, T, d]: what the next query sees besides itself."""
        keep = window - 1  # cloned: a view would keep the whole prompt's keys alive
        self.window = keys[:, max(keys.shape[1] - keep, 0):].clone()

    def nbytes(self) -> int:
        ts = ([self.window] if self.window is not None else [])
        ts += [t for c in self.compressors.values() for t in c.tensors()]
        return sum(t.numel() * t.element_size() for t in ts)


def layer_state(cache, layer_id: int, new_tokens: int) -> V4LayerState | None:
    """The state of layer `layer_id` in `cache` (None: no cache, or one that stores nothing),
    checked for room for `new_tokens` more tokens."""
    if cache is None or isinstance(cache, PaddedRows):
        return None
    hook = getattr(cache, "v4_state", None)
    if callable(hook):
        state = hook(layer_id)
    elif isinstance(cache, ContiguousCache):
        state = cache.state(layer_id, V4LayerState)
    else:
        raise TypeError(f"V4 attention keeps its own per-layer state; {type(cache).__name__} has no "
                        "v4_state(layer_id) (use ContiguousCache, or give the cache that hook)")
    max_len = getattr(cache, "max_len", None)
    if max_len is not None and state.length + new_tokens > max_len:
        raise ValueError(f"cache holds {max_len} tokens; {state.length}+{new_tokens} requested")
    return state


def advance(cache, layer_id: int, state: V4LayerState, new_tokens: int) -> None:
    """Count new_tokens as seen; a ContiguousCache's `lengths` follows, so `cache.length` is the
    next position whichever attention kind its first layer has."""
    state.length += new_tokens
    if isinstance(cache, ContiguousCache):
        cache.lengths[layer_id] = state.length
