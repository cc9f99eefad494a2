"""The KV compressors of V4's compressed attention (report §2.3.1-2.3.2): gated pooling of every m tokens into one entry.

Heavily Compressed Attention (HCA, eqs. 20-23), windows of m' tokens that do not overlap:
    C_i = H_i W^KV,  Z_i = H_i W^Z                                  (kv_proj, gate_proj)
    S_{w,j} = Softmax_j(Z_{wm'+j} + B_j)                             (B = position_bias [m', d])
    C^Comp_w = RMSNorm(Σ_{j<m'} S_{w,j} ⊙ C_{wm'+j})                 (kv_norm)
the softmax running over the window's tokens separately for every channel.

Compressed Sparse Attention (CSA, eqs. 9-12) pools overlapping windows, width 2m, stride m:
each token projects to two series, C^a and C^b (the two halves of kv_proj's 2d outputs, with
their own gate halves and position biases). Entry w pools window w's C^b with window w-1's C^a:
    C^Comp_w = RMSNorm(Σ_{j<m} S^a_{w,j} ⊙ C^a_{(w-1)m+j} + Σ_{j<m} S^b_{w,j} ⊙ C^b_{wm+j}),
one softmax over the 2m logits [Z^a_{(w-1)m+j} + B^a_j ; Z^b_{wm+j} + B^b_j]. Entry 0 has no
window -1: those slots get logit -inf (weight 0).

Every entry then gets RoPE on its last qk_rope_head_dim channels at position w·m (the window's
first token; the "compress" table), so queries see compressed keys at a position too.

Causality: entry w folds tokens up to (w+1)m - 1, so query t may read it only when
(w+1)·m <= t + 1 (`visible_entries`). Only closed windows become entries; the tokens of a
window still open wait in the cache (model/v4/cache.py) for the next call, and a full
forward drops them (no query could read their entry anyway).

Numerics, as DeepSeek's reference: W^KV, W^Z, the position bias B and the norm's weight are
kept in fp32 (bf16 training leaves them out of its bf16 copies: `fp32_parameters`), the
projections read x in fp32, and the pooling and norm run in fp32; the entry is cast back to the
activation dtype after the norm. transformers keeps B and the norm in fp32 too, but runs
kv_proj and gate_proj in the model's dtype (its checkpoints' BF16) and pools in that dtype
(only the softmax in fp32). The two agree in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.v4.cache import CompressorState
from nanoseek.model.v4.rope import V4Rotary, rope_tail


def visible_entries(q_pos: torch.Tensor, n_entries: int, rate: int) -> torch.Tensor:
    """q_pos [S] -> bool [S, N]: entry w is closed before query t, (w + 1)·m <= t + 1."""
    w = torch.arange(n_entries, device=q_pos.device)
    return w[None, :] < ((q_pos + 1) // rate)[:, None]


class Compressor(nn.Module):
    """Gated pooling of `rate` tokens into one `head_dim` entry; `overlap` = CSA's two series.
    A CSA layer's compressor owns its lightning indexer (`indexer`, model/v4/indexer.py), so
    parameter names match the checkpoints' (self_attn.compressor.indexer.*)."""
    # kept in fp32 under bf16 training (train/numerics/bf16_weights.py); an Indexer inherits
    # the list, which names its own compressor's (its q_b_proj and scorer stay bf16, as DeepSeek's)
    fp32_parameters = ("kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight")

    def __init__(self, cfg: ModelConfig, rate: int, head_dim: int, overlap: bool,
                 indexer: nn.Module | None = None):
        super().__init__()
        self.rate, self.head_dim, self.overlap = rate, head_dim, overlap
        width = (2 if overlap else 1) * head_dim
        self.kv_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        if indexer is not None:  # CSA: the lightning indexer that picks this compressor's entries
            self.indexer = indexer

    def compress(self, x: torch.Tensor, rotary: V4Rotary, state: CompressorState | None,
                 read: bool = True) -> torch.Tensor | None:
        """x [B, S, D] (the tokens after those `state` has seen) -> every entry so far [B, N, d].
        read=False only files the new entries with `state` and returns None: CSA's sparse decode
        reads just the top-k of them (`CompressorState.gather_entries`)."""
        B, m = x.shape[0], self.rate
        kv, score = self.project(x)
        first = 0
        if state is not None:
            first = state.n_entries
            if state.pending_kv is not None:
                kv = torch.cat([state.pending_kv, kv], dim=1)
                score = torch.cat([state.pending_score, score], dim=1)
        n = kv.shape[1] // m
        if state is not None:
            state.pending_kv, state.pending_score = kv[:, n * m:].clone(), score[:, n * m:].clone()
        kv = kv[:, :n * m].view(B, n, m, kv.shape[-1])
        score = score[:, :n * m].view(B, n, m, score.shape[-1]) + self.position_bias
        if self.overlap:
            kv, score = self.overlap_windows(kv, score, state)
        pooled = (kv * score.softmax(dim=2)).sum(dim=2)  # [B, n, d]
        entries = self.kv_norm(pooled).to(x.dtype)
        freqs = rotary((first + torch.arange(n, device=x.device)) * m)  # [n, r/2]
        entries = rope_tail(entries.unsqueeze(2), freqs).squeeze(2)
        if state is None:
            return entries
        state.append_entries(entries)
        return state.entries if read else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C = x W^KV and Z = x W^Z, returned in fp32. x is cast to the weights' dtype: fp32
        as kept (a model cast whole to bf16 projects in bf16; a 4-bit QLoRA base, not floating
        point, computes in x's dtype), with autocast off, which would otherwise run these
        linears in bf16 whatever the weights."""
        dtype = self.kv_proj.weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype) if dtype.is_floating_point else x
            return self.kv_proj(x).float(), self.gate_proj(x).float()

    def overlap_windows(self, kv: torch.Tensor, score: torch.Tensor, state: CompressorState | None):
        """[B, n, m, 2d] -> [B, n, 2m, d]: window w's slots are window w-1's C^a then its own C^b.
        Window 0 takes C^a from the state (the last window closed before this call), or
        zeros with logit -inf on the first call."""
        B, n, m, _ = kv.shape
        d = self.head_dim
        if state is not None and state.overlap_kv is not None:
            first_kv, first_score = state.overlap_kv[:, None], state.overlap_score[:, None]
        else:
            first_kv = kv.new_zeros(B, 1, m, d)
            first_score = score.new_full((B, 1, m, d), float("-inf"))
        prev_kv = torch.cat([first_kv, kv[:, :-1, :, :d]], dim=1)[:, :n]
        prev_score = torch.cat([first_score, score[:, :-1, :, :d]], dim=1)[:, :n]
        if state is not None and n > 0:
            state.set_overlap(kv[..., :d], score[..., :d])
        return torch.cat([prev_kv, kv[..., d:]], dim=2), torch.cat([prev_score, score[..., d:]], dim=2)
