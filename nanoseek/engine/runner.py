"""One forward of the model over a batch of sequences of different lengths.

Each sequence contributes its new tokens (a prefill chunk, or the pending token plus an
optional draft); they are right-padded into [B, S] with explicit positions, and the
paged cache's `BatchView` supplies every sequence's cached latents. Prefill runs with
absorb=False (decompress c_KV into per-head k, v over prefix + new tokens, then SDPA);
decode with absorb=True (attention directly over the gathered latents).
"""

from __future__ import annotations

import torch

from nanoseek.engine.cache import BatchView, PagedLatentCache
from nanoseek.model import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedLatentCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.forwards = 0

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        S = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (S - len(r)) for r in rows], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, inputs: list[list[int]], starts: list[int], block_tables: list[list[int]],
                absorb: bool) -> torch.Tensor:
        """inputs[b]: new token ids of sequence b, at positions starts[b], starts[b]+1, ...
        Returns the final normed hidden states [B, S, D] (padding rows are junk)."""
        view = BatchView(self.cache, block_tables, starts, [len(r) for r in inputs], absorb)
        self.forwards += 1
        return self.model.hidden(self._pad(inputs), view.positions, view)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, D] -> fp32 logits [N, V]."""
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def mtp(self, h_prev: list[torch.Tensor], next_ids: list[list[int]], starts: list[int],
            block_tables: list[list[int]], absorb: bool) -> torch.Tensor:
        """MTP module 0 over each sequence's rows: h_prev[b] [n_b, D] at positions starts[b]..,
        next_ids[b] the tokens one further on. Fills the MTP layer's cache; returns fp32
        logits [B, D] of each sequence's last row (the draft for the token after next)."""
        q_lens = [len(r) for r in next_ids]
        S, D = max(q_lens), h_prev[0].shape[-1]
        h = h_prev[0].new_zeros(len(h_prev), S, D)
        for b, rows in enumerate(h_prev):
            h[b, :len(rows)] = rows
        view = BatchView(self.cache, block_tables, starts, q_lens, absorb)
        h = self.model.mtp_hidden(0, h, self._pad(next_ids), view.positions, view)
        # the shared head runs only on the rows whose draft we keep
        last = h[torch.arange(len(q_lens), device=h.device), torch.tensor([n - 1 for n in q_lens], device=h.device)]
        return self.model.mtp_logits(0, last).float()
