"""DeepSeek-V4's attention (V4 report §2.3): shared-KV MQA over a sliding window plus compressed entries.

Interface (what the V4 block calls):

    attn = V4Attention(cfg: ModelConfig, layer_id: int)
    out = attn(x, positions, cache=None)
        x         [B, S, hidden_size]  the block's (normed) input
        positions [B, S] long          absolute positions: arange(S) for a full forward,
                                       cache.length + arange(S) under a ContiguousCache
        cache     None | ContiguousCache (state kept per layer, model/v4/cache.py)
        out       [B, S, hidden_size]

The layer builds its own rotary tables from `positions` (sliding layers: rope_theta;
CSA/HCA layers: compress_rope_theta with YaRN), so the block passes positions, not tables.
RoPE reads `positions`; the masks count tokens (the cache's length + arange(S)), which is
the same thing for every caller nanoseek has.

One layer, three kinds (cfg.layer_type(layer_id)):
    queries   c^Q_t = RMSNorm(W^DQ h_t),  q_{t,h} = RMSNorm_unweighted(W^UQ_h c^Q_t)
    K = V     kv_t = RMSNorm(W^KV h_t)              one head shared by all heads (MQA)
    RoPE      on the last qk_rope_head_dim channels of q and kv (model/v4/rope.py)
    keys      the last n_win tokens, t - n_win < s <= t         (every kind: sliding branch,
                                                                  computed in query blocks)
              + HCA: every compressed entry closed before t     (compressor, m' tokens each)
              + CSA: the indexer's top-k of those entries       (compressor.indexer, m each)
    sinks     o_{t,h} = Σ_s exp(z_{t,h,s}) kv_s / (exp(sink_h) + Σ_s exp(z_{t,h,s})),
              z = q·k / sqrt(head_dim): a learned per-head logit that takes probability mass
              and no value (gpt-oss-style attention sink)
    output    o ← RoPE^{-1}_t(o) on the rope slice (K = V carried the keys' rotation), then
              the grouped low-rank projection: heads in o_groups groups, each group's
              H·head_dim/g channels -> o_lora_rank (o_a_proj, block-diagonal), then all
              g·o_lora_rank -> hidden (o_b_proj).

Parameter names are transformers' (q_a_proj, q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj,
o_b_proj, sinks, compressor.{kv_proj, gate_proj, position_bias, kv_norm}, compressor.indexer.
{same, q_b_proj, scorer.weights_proj}), which the checkpoint code maps to DeepSeek's (attn.wq_a,
q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink, compressor.{wkv, wgate, ape, norm},
indexer.{compressor.*, wq_b, weights_proj}).

CSA reads the indexer's top-k in one of two ways, the same function (tests/test_v4_sparse_decode.py):
  * masked (training, full forwards, the dense warm-up, no more entries than index_topk):
    scores against every compressed entry [B, N, D], the unselected ones masked out (HCA
    reads its entries this way always). Training needs it: the indexer's KL target is the
    attention's probabilities on every candidate.
  * sparse (a cached forward outside training, once a layer has more entries than
    index_topk: decode and cached prefill, `reads_top_k`): the indexer hands each query its
    top-k entry numbers [B, S, k] (ties to the earlier entry, model/dsa.py `top_k_indices`;
    a query that sees fewer than k entries has the extra slots masked), the layer state's
    `gather_entries` reads those entries [B, S, k, D] (a paged cache reads them through its
    block table), and the softmax runs over window + k entries + sink (eq. 17). The cost
    per query past the indexer's O(N) scores no longer grows with the context; the
    compressor files the call's new entries with the state (`compress(read=False)`) and
    hands back none, so no tensor of all the attention's entries is read.

DeepSeek's reference and transformers compute the same fp32 function. Left out, as in
transformers: the reference's FP8 simulation of the window keys' non-rope channels and FP4
simulation + Hadamard rotation of the indexer's q and k (quantisation-aware training; the
rotation leaves q·k unchanged). Top-k ties go to the earlier entry here (model/v4/indexer.py);
both references use an unordered topk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.config.model_config import CSA, HCA, SLIDING
from nanoseek.model.norm import RMSNorm, head_rms_norm
from nanoseek.model.v4.cache import V4LayerState, advance, layer_state
from nanoseek.model.v4.compressor import Compressor, visible_entries
from nanoseek.model.v4.decode import decode_attention
from nanoseek.model.v4.indexer import Indexer
from nanoseek.model.v4.rope import V4Rotary, rope_tail


class GroupedLinear(nn.Linear):
    """Block-diagonal W^{O,a}: group g's H·d/g channels -> its own d_g (report §2.3.1,
    "Grouped Output Projection"). weight [g·d_g, H·d/g], group g's rows g·d_g ... (g+1)·d_g."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., g, H·d/g] -> [..., g, d_g]."""
        w = self.weight.view(self.groups, -1, self.in_features)
        return torch.einsum("...gi,gri->...gr", x, w)


class V4Attention(nn.Module):
    # bf16 training keeps the sinks fp32 (train/numerics/bf16_weights.py), as DeepSeek keeps
    # attn_sink; the compressors name theirs (model/v4/compressor.py)
    fp32_parameters = ("sinks",)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.layer_type = layer_id, cfg.layer_type(layer_id)
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.window, self.eps, self.o_groups = cfg.sliding_window, cfg.rms_norm_eps, cfg.o_groups
        dim, H, D = cfg.hidden_size, self.n_heads, self.head_dim
        self.q_a_proj = nn.Linear(dim, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.kv_proj = nn.Linear(dim, D, bias=False)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.softmax_scale = D ** -0.5
        self.rotary = V4Rotary(cfg, "main" if self.layer_type == SLIDING else "compress")
        rate = cfg.compress_rate(self.layer_type)
        self.compressor = None
        if self.layer_type == HCA:
            self.compressor = Compressor(cfg, rate, D, overlap=False)
        elif self.layer_type == CSA:
            self.compressor = Compressor(cfg, rate, D, overlap=True, indexer=Indexer(cfg))

    # ------------------------------------------------------------------ branches
    def sliding_blocks(self, kv: torch.Tensor, state: V4LayerState | None):
        """The sliding branch's keys in blocks of queries: [B, nb, 2w-1, D] and mask [S, 2w-1].

        Queries go in blocks of w = n_win; block b (queries bw ... bw+w-1) can only reach the
        2w-1 keys ending at its last query, so a forward costs S·(2w-1) scores, not S². The
        keys are the state's last tokens (P <= w-1 of them) then this call's, front-padded to
        w-1 and end-padded to whole blocks: block b's keys are padded[bw : bw+2w-1], and
        query q of a block sees key k of its block iff q <= k <= q + w - 1 (and k is real)."""
        B, S, D = kv.shape
        w = self.window
        keys = kv if state is None or state.window is None else torch.cat([state.window, kv], dim=1)
        if state is not None:
            state.keep_window(keys, w)
        P, nb = keys.shape[1] - S, -(-S // w)
        padded = F.pad(keys, (0, 0, w - 1 - P, nb * w - S))
        blocks = padded.unfold(1, 2 * w - 1, w).transpose(-1, -2)  # [B, nb, 2w-1, D]
        qi = torch.arange(nb * w, device=kv.device)[:, None]  # query, padded to whole blocks
        kj = torch.arange(2 * w - 1, device=kv.device)[None, :]  # key within its block
        at = qi - qi % w + kj  # the key's index in `padded`
        real = (at >= w - 1 - P) & (at < w - 1 + S)
        band = (kj >= qi % w) & (kj <= qi % w + w - 1)
        return blocks, (band & real)[:S]

    def reads_top_k(self, state: V4LayerState | None, n_entries: int) -> bool:
        """Whether this forward gathers each query's top-k entries instead of masking all
        n_entries: a CSA layer under a cache, outside training, whose indexer selects (more
        entries than index_topk, not the dense warm-up). Training keeps the mask: the
        indexer's KL target needs the attention's probabilities on every candidate."""
        return (self.layer_type == CSA and state is not None and not self.training
                and not self.compressor.indexer.attends_all(n_entries))

    def compressed_keys(self, x, q_residual, freqs_cis, start: int, state: V4LayerState | None):
        """The compressed entries the queries read, the mask of those each query reads, and for
        CSA the indexer's scores (for its loss). Masked: every entry [B, N, D] and the mask
        [B, S, N]. Sparse (`reads_top_k`): each query's top-k entries [B, S, k, D], read
        through the state's `gather_entries`, and which of them it may see [B, S, k]."""
        B, S, _ = x.shape
        q_pos = torch.arange(start, start + S, device=x.device)
        c = self.compressor
        cstate = state.compressor("compressor") if state else None
        if self.layer_type == HCA:
            entries = c.compress(x, self.rotary, cstate)
            return entries, visible_entries(q_pos, entries.shape[1], c.rate).expand(B, -1, -1), None
        # The indexer learns only from its own loss: its inputs are cut from the graph. It
        # compresses the same tokens at the same rate, so its N is the attention's.
        scores, visible = c.indexer(x.detach(), q_residual.detach(), freqs_cis, self.rotary, q_pos,
                                    state.compressor("indexer") if state else None)
        if self.reads_top_k(state, scores.shape[-1]):
            c.compress(x, self.rotary, cstate, read=False)  # files this call's entries, reads none
            idx, valid = c.indexer.top_k(scores, visible)
            return cstate.gather_entries(idx), valid, scores
        return c.compress(x, self.rotary, cstate), c.indexer.select(scores, visible), scores

    def attend(self, q, blocks, window_mask, entries=None, entry_mask=None):
        """o_{t,h} = Σ_s softmax_s([z_{t,h,s} ; sink_h]) · kv_s over the window's keys (blocks,
        window_mask [S, 2w-1]) and the compressed entries under entry_mask: every entry
        [B, N, D] with a mask [B, S, N], or each query's own k [B, S, k, D] (sparse) with
        [B, S, k]. Returns o [B, S, H, D] and the probabilities on the entries [B, S, H, N|k]
        in fp32 (the indexer's KL target, as V3.2's MLA.attention_probs; None without entries)."""
        B, S, H, D = q.shape
        nb, w = blocks.shape[1], self.window
        qb = F.pad(q, (0, 0, 0, 0, 0, nb * w - S)).view(B, nb, w, H, D)
        z = torch.einsum("bnqhd,bnkd->bnqhk", qb, blocks).reshape(B, nb * w, H, -1)[:, :S]
        parts = [z.float().masked_fill(~window_mask[:, None, :], float("-inf"))]
        if entries is not None:
            keys = "bskd" if entries.dim() == 4 else "bkd"  # each query's own, or shared by all
            zc = torch.einsum(f"bshd,{keys}->bshk", q, entries).float()
            parts.append(zc.masked_fill(~entry_mask.unsqueeze(-2), float("-inf")))
        z = torch.cat(parts, dim=-1) * self.softmax_scale
        sink = self.sinks.float().view(1, 1, H, 1).expand(B, S, H, 1)
        probs = torch.cat([z, sink], dim=-1).softmax(dim=-1)[..., :-1]  # fp32
        pw, pc = probs.to(q.dtype).split([2 * w - 1, probs.shape[-1] - 2 * w + 1], dim=-1)
        pw = F.pad(pw, (0, 0, 0, 0, 0, nb * w - S)).view(B, nb, w, H, -1)
        o = torch.einsum("bnqhk,bnkd->bnqhd", pw, blocks).reshape(B, nb * w, H, D)[:, :S]
        if entries is None:
            return o, None
        return o + torch.einsum(f"bshk,{keys}->bshd", pc, entries), probs[..., 2 * w - 1:]

    # ------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        state = layer_state(cache, self.layer_id, S)
        if getattr(state, "ragged", False):  # B sequences at B lengths, one token each (the engine's decode)
            return decode_attention(self, x, positions, state)
        start = state.length if state is not None else 0
        freqs_cis = self.rotary(positions)  # [B, S, r/2]

        q_residual = self.q_a_norm(self.q_a_proj(x))
        q = head_rms_norm(self.q_b_proj(q_residual).view(B, S, H, D), self.eps)
        q = rope_tail(q, freqs_cis)
        kv = rope_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(2), freqs_cis).squeeze(2)

        blocks, window_mask = self.sliding_blocks(kv, state)
        if self.compressor is None:
            o, _ = self.attend(q, blocks, window_mask)
        else:
            entries, chosen, index_scores = self.compressed_keys(x, q_residual, freqs_cis, start, state)
            o, p_entries = self.attend(q, blocks, window_mask, entries, chosen)
            if index_scores is not None:
                indexer = self.compressor.indexer
                indexer.indexer_loss = indexer.kl = None
                if self.training and indexer.loss_coef > 0:
                    indexer.learn(index_scores, p_entries, chosen, getattr(cache, "token_mask", None))
        if state is not None:
            advance(cache, self.layer_id, state, S)

        o = rope_tail(o, freqs_cis, inverse=True)
        o = self.o_a_proj(o.reshape(B, S, self.o_groups, -1)).flatten(2)
        return self.o_b_proj(o)
