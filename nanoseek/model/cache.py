"""The KV-cache protocol the attention layers talk to, and a contiguous implementation.

An attention layer hands the cache what it computed for the new tokens and gets back
everything the queries may attend to, plus a boolean mask. MLA hands over the latents
(c_KV, k_pe), and V3.2's MLA a third tensor, its lightning indexer's keys (model/dsa.py);
the MHA/GQA/MQA baselines hand over (k, v). A V4 attention layer stores no per-token tensors
this way: it keeps one state per layer (sliding window, compressor buffers, compressed
entries; model/v4/cache.py) through `cache.state(layer_id, make)`. The engine implements the
same protocol over paged blocks (`nanoseek.engine`); `ContiguousCache` is the simple one used
by `CausalLM.generate`, the tests and the benchmarks.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    absorb: bool  # True: MLA attends in latent space (decode); False: decompress (prefill)
    # optional: token_mask [B, S] bool, True = a real token, for a layout with padding
    # columns (`PaddedRows` below); the MoE leaves padding out of its load and losses
    # optional, for V3.2's decode to read only the top-k latents (the engine's BatchView):
    #   update_index_keys(layer_id, c_kv, k_pe, index_k) -> ((index_k_all,), mask): stores all
    #       three, reads back the indexer keys alone;
    #   gather(layer_id, idx [B,S,k]) -> (c_kv [B,S,k,r], k_pe [B,S,k,rope]): the chosen rows

    def update(self, layer_id: int, *new: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Store new [B, S, ...] entries; return all [B, T, ...] entries and a [B, S, T]
        boolean mask (True = may attend), or None for plain causal attention with S == T."""
        ...


class PaddedRows:
    """The Cache protocol with no storage, for one causal forward over right-padded rows:
    attention stays plain causal (nothing is stored, no mask), and `token_mask` [B, S]
    (True = a real token) keeps the padding out of the MoE's load and losses."""
    absorb = False

    def __init__(self, token_mask: torch.Tensor):
        self.token_mask = token_mask

    @staticmethod
    def through_last(labelled: torch.Tensor) -> torch.Tensor:
        """labelled [B, S] bool -> [B, S] bool, True up to each row's last labelled column:
        the real tokens of rows that end with their last label (the rest is padding)."""
        col = torch.arange(labelled.shape[1], device=labelled.device)
        return col[None, :] <= torch.where(labelled, col, -1).amax(dim=1, keepdim=True)

    def update(self, layer_id: int, *new: torch.Tensor):
        return new, None


class ContiguousCache:
    """Per-layer tensors [B, max_len, ...] for a batch that advances in lock-step.

    `absorb` defaults to True: once a prompt is prefilled, MLA decode works directly on
    c_KV and k_pe, which is the point of the latent cache.
    """

    def __init__(self, batch_size: int, max_len: int, absorb: bool = True):
        self.batch_size, self.max_len, self.absorb = batch_size, max_len, absorb
        self.layers: dict[int, list[torch.Tensor]] = {}
        self.lengths: dict[int, int] = {}  # tokens stored per layer
        self.states: dict[int, object] = {}  # per-layer state kept besides tensors (V4)

    @property
    def length(self) -> int:
        """Tokens stored by the first layer: the position the next token takes."""
        return self.lengths[min(self.lengths)] if self.lengths else 0

    def update(self, layer_id, *new):
        B, S = new[0].shape[:2]
        start = self.lengths.get(layer_id, 0)
        if start + S > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {start}+{S} requested")
        if layer_id not in self.layers:
            self.layers[layer_id] = [t.new_zeros(B, self.max_len, *t.shape[2:]) for t in new]
        stored = self.layers[layer_id]
        for buf, t in zip(stored, new):
            buf[:, start:start + S] = t
        T = self.lengths[layer_id] = start + S
        q_pos = torch.arange(start, T, device=new[0].device)
        mask = q_pos[:, None] >= torch.arange(T, device=new[0].device)[None, :]
        return tuple(buf[:, :T] for buf in stored), mask.expand(B, S, T)

    def state(self, layer_id: int, make):
        """The state a layer keeps besides the stored tensors (V4's sliding window, compressor
        buffers and compressed entries: model/v4/cache.py), made by `make()` on first use."""
        if layer_id not in self.states:
            self.states[layer_id] = make()
        return self.states[layer_id]

    def nbytes(self) -> int:
        """Bytes held for the tokens stored so far (what a token costs, times tokens), the
        layers' own states included."""
        return (sum(buf[:, :self.lengths[layer]].numel() * buf.element_size()
                    for layer, bufs in self.layers.items() for buf in bufs)
                + sum(s.nbytes() for s in self.states.values()))
