"""CSA's lightning indexer (report §2.3.1, eqs. 13-17): scores compressed entries per query, keeps the top-k, and learns from a KL loss.

The indexer compresses the same tokens as its CSA layer, with its own overlapping compressor at
index_head_dim (K^IComp, eqs. 9-12 with W^{IKV}, W^{IZ}), and queries from the attention's
q-LoRA latent c^Q_t (shared with the main queries):
    q^I_{t,h} = RoPE(W^{IUQ}_h c^Q_t)                                 (q_b_proj)
    w^I_{t,h} = (W^w h_t)_h · n_h^{-1/2}                              (scorer.weights_proj)
    I_{t,s}   = Σ_h w^I_{t,h} · ReLU(q^I_{t,h} · K^IComp_s) · c^{-1/2}   (eq. 15)
over the entries query t may see ((s + 1)·m <= t + 1), and the attention reads the top
index_topk of them (eq. 17): as a mask over every entry (`select`, training and full forwards)
or as each query's entry numbers (`top_k`, cached decoding, which gathers only those entries).

DeepSeek's reference also applies a Hadamard rotation to q^I and K^IComp and simulates FP4 on
them (quantisation-aware training of the indexer's QK path). The rotation is orthonormal, so
q·k is unchanged; nanoseek, like transformers, leaves out both (no FP4 simulation).

Training (V3.2 §2.1's recipe, which V4 keeps for CSA's indexer): top-k passes no gradient, so
the indexer learns from its own loss. The target is the main attention's distribution over the
same candidates, summed over heads and L1-normalised,
    p_{t,s} = Σ_h A_{t,h,s} / Σ_{s' ∈ S_t} Σ_h A_{t,h,s'},
    L^I = mean_t KL(p_{t,S_t} ‖ Softmax(I_{t,S_t})),
where S_t is every entry query t may see in the dense warm-up (cfg.indexer_mode "dense": the
attention reads all of them) and the selected top-k in sparse training. The indexer's inputs
are detached (V3.2: "the indexer input is detached from the computational graph"), so L^I
trains only the indexer and the language-model loss only the rest. The switch (indexer_mode)
and the loss are V3.2's code (model/dsa.py `IndexerTraining`): the loss is set, times
cfg.indexer_loss_coef, on `indexer_loss` during a training forward (None otherwise), and the
paper's Σ_t is divided by the number of query tokens (a query that sees no entry yet counts 0),
padding left out.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.dsa import IndexerTraining, top_k_indices, top_k_mask
from nanoseek.model.v4.cache import CompressorState
from nanoseek.model.v4.compressor import Compressor, visible_entries
from nanoseek.model.v4.rope import V4Rotary, rope_tail


class IndexerScorer(nn.Module):
    """I_{t,s} = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s) · c^{-1/2}, with w_{t,h} = W^w h_t · n_h^{-1/2}."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)
        self.softmax_scale = cfg.index_head_dim ** -0.5
        self.weights_scale = cfg.index_n_heads ** -0.5

    def forward(self, q: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """q [B, S, H, c], keys [B, N, c], x [B, S, D] -> I [B, S, N] (fp32)."""
        s = torch.einsum("bshc,bnc->bshn", q.float(), keys.float()).relu() * self.softmax_scale
        w = self.weights_proj(x).float() * self.weights_scale
        return torch.einsum("bshn,bsh->bsn", s, w)


class Indexer(IndexerTraining, Compressor):
    """Lightning indexer of a CSA layer: its own compressor (inherited) plus the query head;
    its switch and loss are V3.2's (IndexerTraining: `mode`, `index_topk`, `learn`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.compress_rate_csa, cfg.index_head_dim, overlap=True)
        self.n_heads = cfg.index_n_heads
        self.init_training(cfg)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = IndexerScorer(cfg)

    def forward(self, x: torch.Tensor, q_residual: torch.Tensor, freqs_cis: torch.Tensor,
                rotary: V4Rotary, q_pos: torch.Tensor, state: CompressorState | None):
        """x [B, S, D], q_residual [B, S, q_lora_rank], freqs_cis [B, S, r/2] (the queries'),
        q_pos [S] -> (scores I [B, S, N], -inf where unseen; visible [B, S, N] bool, the
        entries each query may see). `select` or `top_k` turns them into S_t."""
        B, S, _ = x.shape
        keys = self.compress(x, rotary, state)
        q = rope_tail(self.q_b_proj(q_residual).view(B, S, self.n_heads, self.head_dim), freqs_cis)
        visible = visible_entries(q_pos, keys.shape[1], self.rate).expand(B, -1, -1)
        scores = self.scorer(q, keys, x).masked_fill(~visible, float("-inf"))
        return scores, visible

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The entries each query attends: all it may see (dense warm-up, or no more than
        index_topk of them), else the top index_topk by score among those (eq. 17).
        Ties (ReLU makes exact zeros common in small indexers) go to the earlier entry, so a
        full forward and a cached one, which see different numbers of entries, agree: V3.2's
        rule (model/dsa.py `top_k_mask`)."""
        if self.attends_all(scores.shape[-1]):
            return visible
        return top_k_mask(scores, self.index_topk) & visible

    def top_k(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S_t as entry numbers, for the sparse path that gathers them (only when attention does
        not read every entry: not `attends_all`): (idx [B, S, k] long, ascending; valid
        [B, S, k] bool), k = index_topk. A query that sees fewer than k entries also gets
        unseen ones (scored -inf), which `valid` marks False, so {idx | valid} is exactly
        `select`'s mask: the same tie rule (model/dsa.py `top_k_indices`)."""
        idx = top_k_indices(scores, self.index_topk)
        return idx, visible.gather(-1, idx)
