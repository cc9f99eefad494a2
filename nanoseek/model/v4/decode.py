"""A few new tokens for each of B sequences at different lengths: V4 attention for a batched decode step.

`V4Attention.forward` runs a batch whose rows share one length (a V4 layer's state has one
`length`: model/v4/cache.py). An engine's decode step has B sequences at B different positions,
each adding one token (and, with speculation, the MTP draft after it); this module computes the
same function for that case, so the step runs as one batched forward instead of B forwards.
A row's tokens go one after another (`state.at(s)`); below, p_b is the position of row b's
token being computed. It reads a *ragged* state (the engine's, engine/v4_decode.py) with
per-row tensors:

    state.at(s)                the state for the row's s-th new token (itself, for chaining)
    state.window, .window_valid [B, n_win-1, d], [B, n_win-1]   rows of p_b - n_win + 1 .. p_b - 1
    state.write_window(kv)      kv [B, 1, d]   this token's K=V row (the next token's window)
    state.compressor(name) ->   per compressor ("compressor", CSA's "indexer"):
        .pending_kv, .pending_score   [B, m, coff·d] fp32: the open window's rows, row i for
                                      position (p_b - p_b % m) + i, valid for i < p_b % m
        .overlap_kv, .overlap_score   [B, m, d] fp32 (CSA): C^a of the last closed window, score
                                      -inf where none has closed yet
        .store(pending_kv, pending_score, overlap_kv, overlap_score, closing, entry)
        .all_entries() -> (entries [B, N, d], visible [B, N])   after the store
        .gather_entries(idx [B, 1, k]) -> [B, 1, k, d]

Per row, the compressor files the token's projections at slot p_b % m of its open window; a row
whose window this token closes ((p_b + 1) % m == 0) pools it into a new entry exactly as
`Compressor.compress` pools a whole window (every row is pooled, the store keeps the closing
rows'). Attention then reads the window (n_win keys with its own), and HCA's entries or CSA's
indexer top-k (`dsa.top_k_indices`, ties to the earlier entry, as every other path picks), plus
the sink, in one softmax, as `V4Attention.attend` does.
"""

from __future__ import annotations

import torch

from nanoseek.config.model_config import HCA
from nanoseek.model.dsa import top_k_indices
from nanoseek.model.norm import head_rms_norm
from nanoseek.model.v4.rope import rope_tail


def compress_one(c, x: torch.Tensor, rotary, pos: torch.Tensor, state) -> None:
    """File one token per row x [B, 1, D] (at positions pos [B]) with compressor c's ragged state,
    pooling an entry for the rows whose window it closes."""
    B, m, d = x.shape[0], c.rate, c.head_dim
    kv, score = c.project(x)  # [B, 1, coff·d] fp32
    rows, slot = torch.arange(B, device=x.device), pos % m
    pend_kv, pend_score = state.pending_kv.clone(), state.pending_score.clone()
    pend_kv[rows, slot], pend_score[rows, slot] = kv[:, 0], score[:, 0]
    wkv, wscore = pend_kv, pend_score + c.position_bias  # [B, m, coff·d]
    overlap_kv, overlap_score = None, None
    if c.overlap:  # CSA: [C^a of the previous window ; C^b of this one], one softmax over 2m
        overlap_kv, overlap_score = wkv[..., :d], wscore[..., :d]
        wkv = torch.cat([state.overlap_kv, wkv[..., d:]], dim=1)
        wscore = torch.cat([state.overlap_score, wscore[..., d:]], dim=1)
    pooled = (wkv * wscore.softmax(dim=1)).sum(dim=1, keepdim=True)  # [B, 1, d]
    entry = c.kv_norm(pooled).to(x.dtype)
    entry = rope_tail(entry.unsqueeze(2), rotary((pos + 1 - m)[:, None])).squeeze(2)
    closing = (pos + 1) % m == 0
    if c.overlap:
        keep = closing[:, None, None]
        overlap_kv = torch.where(keep, overlap_kv, state.overlap_kv)
        overlap_score = torch.where(keep, overlap_score, state.overlap_score)
    state.store(pend_kv, pend_score, overlap_kv, overlap_score, closing, entry[:, 0])


def csa_select(attn, x, q_residual, freqs_cis, pos, state) -> tuple[torch.Tensor, torch.Tensor]:
    """CSA: the entries each row's query reads, [B, k] numbers and [B, k] valid, from its
    lightning indexer (all visible ones in the dense warm-up or when no more than index_topk)."""
    ind = attn.compressor.indexer
    istate = state.compressor("indexer")
    compress_one(ind, x, attn.rotary, pos, istate)
    keys, visible = istate.all_entries()  # [B, N, c]
    B, N = visible.shape
    if ind.attends_all(N):
        return torch.arange(N, device=x.device).expand(B, N), visible
    q = rope_tail(ind.q_b_proj(q_residual).view(B, 1, ind.n_heads, ind.head_dim), freqs_cis)
    scores = ind.scorer(q, keys, x)[:, 0].masked_fill(~visible, float("-inf"))  # [B, N]
    idx = top_k_indices(scores, ind.index_topk)
    return idx, idx < visible.sum(-1, keepdim=True)  # visible entries are a prefix of each row


def decode_attention(attn, x: torch.Tensor, positions: torch.Tensor, state) -> torch.Tensor:
    """V4Attention's function for x [B, S, D] at positions [B, S] (S small: a token and the
    drafts that follow it) over a ragged state: the S tokens of a row go one after another,
    each seeing the window rows and compressor state the ones before it left."""
    return torch.cat([one_token(attn, x[:, s:s + 1], positions[:, s:s + 1], state.at(s))
                      for s in range(x.shape[1])], dim=1)


def one_token(attn, x: torch.Tensor, positions: torch.Tensor, state) -> torch.Tensor:
    """x [B, 1, D] at positions [B, 1] -> the layer's output [B, 1, D]."""
    B, H = x.shape[0], attn.n_heads
    pos = positions[:, 0]
    freqs_cis = attn.rotary(positions)  # [B, 1, r/2]
    q_residual = attn.q_a_norm(attn.q_a_proj(x))
    q = attn_queries(attn, q_residual, freqs_cis)  # [B, H, D]
    kv = rope_tail(attn.kv_norm(attn.kv_proj(x)).unsqueeze(2), freqs_cis).squeeze(2)  # [B, 1, D]
    keys = torch.cat([state.window, kv], dim=1)  # [B, n_win, D]
    valid = torch.cat([state.window_valid, valid_ones(B, x.device)], dim=1)
    state.write_window(kv)
    if attn.compressor is not None:
        cstate = state.compressor("compressor")
        compress_one(attn.compressor, x, attn.rotary, pos, cstate)
        if attn.layer_type == HCA:
            entries, visible = cstate.all_entries()
        else:
            idx, visible = csa_select(attn, x, q_residual, freqs_cis, pos, state)
            entries = cstate.gather_entries(idx[:, None])[:, 0]  # [B, k, D]
        keys, valid = torch.cat([keys, entries], dim=1), torch.cat([valid, visible], dim=1)
    # a key past a row's own (window padding, an index past its entries) may be another request's
    # row read through the block tables: zeroed, since a masked probability 0 times a NaN is NaN
    keys = keys.masked_fill(~valid[..., None], 0)
    z = torch.einsum("bhd,bkd->bhk", q, keys).float().masked_fill(~valid[:, None], float("-inf"))
    z = z * attn.softmax_scale
    sink = attn.sinks.float().view(1, H, 1).expand(B, H, 1)
    probs = torch.cat([z, sink], dim=-1).softmax(dim=-1)[..., :-1].to(q.dtype)
    o = torch.einsum("bhk,bkd->bhd", probs, keys).unsqueeze(1)  # [B, 1, H, D]
    o = rope_tail(o, freqs_cis, inverse=True)
    o = attn.o_a_proj(o.reshape(B, 1, attn.o_groups, -1)).flatten(2)
    return attn.o_b_proj(o)


def attn_queries(attn, q_residual: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    B = q_residual.shape[0]
    q = head_rms_norm(attn.q_b_proj(q_residual).view(B, 1, attn.n_heads, attn.head_dim), attn.eps)
    return rope_tail(q, freqs_cis)[:, 0]


def valid_ones(B: int, device) -> torch.Tensor:
    return torch.ones(B, 1, dtype=torch.bool, device=device)
