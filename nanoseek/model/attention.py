"""Multi-head Latent Attention (DeepSeek-V2 §2.1) and the MHA/GQA/MQA baselines.

MLA compresses keys and values into one latent per token:
    [c_KV | k_pe] = W_DKV h,  c_KV = RMSNorm(c_KV),  k_pe = RoPE(k_pe)  (one key for all heads)
    [k_nope | v]  = W_UKV c_KV  (per head)
and queries through a low-rank bottleneck when q_lora_rank is set:
    q = W_UQ RMSNorm(W_DQ h),  split per head into q_nope and q_pe = RoPE(q_pe).
score = (q_nope·k_nope + q_pe·k_pe) · softmax_scale.

Three ways to compute the same thing:
  * "sdpa"   training and prefill: decompress k, v and call scaled_dot_product_attention;
  * "absorb" decode: fold W_UK into the query and W_UV into the output, so attention runs
             directly over the cached c_KV and k_pe (kv_lora_rank + qk_rope_head_dim numbers
             per token) and nothing per-head is ever materialised for the past;
  * "naive"  a reference written out with an explicit softmax, for the tests.

DeepSeek-V3.2 (cfg.arch == "v32") adds DeepSeek Sparse Attention: a lightning indexer
(model/dsa.py) scores the cached tokens for every query and attention reads only the top-k
of them, S_t. Training and prefill mask the rest (SDPA, naive); inference on the absorbed
path (decode) gathers each query's k latents and attends over those alone (`attend_top_k`),
so its cost per query stops growing with the context beyond the indexer's O(T) scores. The
indexer's keys are cached as a third tensor beside c_KV and k_pe. In the dense warm-up
(indexer_mode "dense") attention stays dense and the indexer only learns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import Cache
from nanoseek.model.dsa import LightningIndexer, causal_mask
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rotary_emb, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, impl: str = "sdpa"):
        super().__init__()
        self.layer_id, self.impl = layer_id, impl
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        dim, H = cfg.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        self.indexer = LightningIndexer(cfg) if cfg.is_v32 else None

    # ------------------------------------------------------------- projections
    def project(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        """x [B,S,D] -> q_nope [B,S,H,nope], q_pe [B,S,H,rope], c_kv [B,S,r], k_pe [B,S,rope]."""
        return *self.queries(self.q_latent(x), freqs_cis), *self.kv_latents(x, freqs_cis)

    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """c_Q = RMSNorm(W_DQ h) [B,S,q_lora_rank] (the indexer reads it too), or h without q-LoRA."""
        return x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))

    def queries(self, c_q: torch.Tensor, freqs_cis: torch.Tensor):
        B, S, _ = c_q.shape
        q = self.q_proj(c_q) if self.q_lora_rank is None else self.q_b_proj(c_q)
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_emb(q_pe, freqs_cis)

    def kv_latents(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)
        return c_kv, k_pe

    def decompress(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Latents [B,T,r], [B,T,rope] -> per-head k [B,T,H,qk_head_dim], v [B,T,H,v_head_dim]."""
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        return k, v

    # ---------------------------------------------------------------- the paths
    def attend_sdpa(self, q_nope, q_pe, c_kv, k_pe, mask):
        k, v = self.decompress(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # Fused (flash) kernels want one head size for q, k and v: pad v with zeros up to
        # qk_head_dim and drop the padding afterwards, as vLLM does for MLA prefill.
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None, scale=self.softmax_scale)
        return out.transpose(1, 2)[..., :self.v_head_dim]  # [B,S,H,v]

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        k, v = self.decompress(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, k).float() * self.softmax_scale
        probs = self._softmax(scores, mask, q.dtype)
        return torch.einsum("bsht,bthd->bshd", probs, v)

    @torch.no_grad()
    def attention_probs(self, q_nope, q_pe, c_kv, k_pe, mask):
        """The main attention's softmax [B,S,H,T] in fp32: the indexer's (detached) target."""
        k, _ = self.decompress(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, k).float() * self.softmax_scale
        return self._softmax(scores, mask, torch.float32)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention over the latents themselves (decode): per head h,
            q^C = W_UK,h^T q^nope,  scores_t = q^C·c_t + q^R·k^R_t,  out = W_UV,h Σ_t p_t c_t.
        Written as bmm's, each the einsum in its comment: on CPU torch.einsum ran the
        probabilities-times-latents product in a slow operand order (a [16, 4, 128] x
        [16, 128, 64] product: 250 us against 20 us as a plain bmm, one thread)."""
        w_uk, w_uv = self.absorbed_weights(c_kv.dtype)
        q_latent = per_head(q_nope, w_uk)  # "bshd,hdc->bshc": W_UK absorbed into q
        scores = (over_keys(q_latent, c_kv.transpose(1, 2))       # "bshc,btc->bsht"
                  + over_keys(q_pe, k_pe.transpose(1, 2))).float() * self.softmax_scale  # "bshr,btr->bsht"
        probs = self._softmax(scores, mask, c_kv.dtype)
        o_latent = over_keys(probs, c_kv)  # "bsht,btc->bshc"
        return per_head(o_latent, w_uv.transpose(1, 2))  # "bshc,hdc->bshd": W_UV absorbed into the output

    def attend_top_k(self, q_nope, q_pe, c_kv, k_pe, valid):
        """The absorbed path over each query's own gathered keys (V3.2 decode): c_kv
        [B,S,k,r], k_pe [B,S,k,rope], valid [B,S,k] -> [B,S,H,v]. Per query t,
            u_t = W_UV Σ_{s∈S_t} softmax_s(q_t^C·c_s + q_t^R·k^R_s) c_s,  q_t^C = W_UK^T q_t^nope,
        the same sum as `attend_absorbed` with the mask, over k latents instead of T."""
        w_uk, w_uv = self.absorbed_weights(c_kv.dtype)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = (torch.einsum("bshc,bskc->bshk", q_latent, c_kv)
                  + torch.einsum("bshr,bskr->bshk", q_pe, k_pe)).float() * self.softmax_scale
        probs = self._softmax(scores, valid, c_kv.dtype)
        o_latent = torch.einsum("bshk,bskc->bshc", probs, c_kv)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r], the two halves of W_UKV, to fold into the
        query and the output."""
        wkv_b = self.wkv_b(dtype).view(self.n_heads, -1, self.kv_lora_rank)
        return wkv_b[:, :self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim:]

    def wkv_b(self, dtype: torch.dtype) -> torch.Tensor:
        """W_UKV as a matrix, for absorption. FP8 weights (an FP8Linear) are dequantised on
        the fly, as DeepSeek-V3's inference/model.py does: the module keeps them in FP8."""
        proj = self.kv_b_proj
        if hasattr(proj, "dequantized_weight"):
            return proj.dequantized_weight(dtype)
        return proj.weight

    def absorbable(self) -> bool:
        """Absorption reads W_UKV as a dense matrix (wkv_b): a plain Linear or an FP8Linear.
        A wrapped kv_b_proj (LoRA adapters, a 4-bit NF4 weight: train/posttrain/lora.py,
        train/posttrain/qlora.py) computes W_UKV c_KV only through its forward, so decode then
        decompresses the cached latents instead (same result)."""
        return type(self.kv_b_proj) is nn.Linear or hasattr(self.kv_b_proj, "dequantized_weight")

    @staticmethod
    def _softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype) -> torch.Tensor:
        """scores [B,S,H,T] in fp32; mask [B,S,T] or None (causal, S == T)."""
        if mask is None:
            S, T = scores.shape[1], scores.shape[-1]
            mask = causal_mask(S, T, scores.device)
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        return scores.softmax(dim=-1).to(dtype)

    def select_tokens(self, x, c_q, freqs_cis, index_k, mask):
        """DSA's fine-grained token selection -> (I [B,S,T], the attention's mask): S_t, the
        top-k keys of each query; the mask as given (None = causal) in the dense warm-up or
        while T <= index_topk."""
        S, T = x.shape[1], index_k.shape[1]
        allowed = self._allowed(mask, S, T, x.device)
        scores = self.indexer(x, c_q, freqs_cis, index_k, allowed)
        if self.indexer.attends_all(T):
            return scores, mask
        return scores, self.indexer.select(scores, allowed)

    def reads_top_k(self, cache: Cache | None) -> bool:
        """Whether this forward gathers each query's top-k latents instead of masking all T:
        V3.2 inference on the absorbed path, i.e. decode (the engine and `generate` prefill
        with absorb=False: decompress and mask). Training keeps the mask: the indexer's KL
        target needs the main attention over every key."""
        return (self.indexer is not None and not self.training and cache is not None
                and cache.absorb and self.absorbable())

    def top_k_latents(self, x, c_q, freqs_cis, new, cache: Cache):
        """Store the new tokens, score every cached indexer key, and read only the latents of
        each query's top-k -> c_kv [B,S,k,r], k_pe [B,S,k,rope], valid [B,S,k].

        A cache with `gather(layer_id, idx)` (the engine's paged BatchView) returns only the
        indexer keys from `update_index_keys` and reads the chosen latents through its block
        table, so no [B,T,r] tensor of every latent is built; any other cache (ContiguousCache)
        returns views of all its latents from `update`, indexed here."""
        paged = hasattr(cache, "gather")
        if paged:
            (index_k,), mask = cache.update_index_keys(self.layer_id, *new)
        else:
            (c_kv, k_pe, index_k), mask = cache.update(self.layer_id, *new)
        allowed = self._allowed(mask, x.shape[1], index_k.shape[1], x.device)
        idx, valid = self.indexer.top_k(self.indexer(x, c_q, freqs_cis, index_k, allowed), allowed)
        if paged:
            c_kv, k_pe = cache.gather(self.layer_id, idx)
        else:
            c_kv, k_pe = gather_rows(c_kv, idx), gather_rows(k_pe, idx)
        return c_kv.to(x.dtype), k_pe.to(x.dtype), valid

    @staticmethod
    def _allowed(mask: torch.Tensor | None, S: int, T: int, device) -> torch.Tensor:
        return causal_mask(S, T, device) if mask is None else mask

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: Cache | None = None):
        B, S, _ = x.shape
        c_q = self.q_latent(x)
        q_nope, q_pe = self.queries(c_q, freqs_cis)
        new = self.kv_latents(x, freqs_cis)
        if self.indexer is not None:
            new = (*new, self.indexer.keys(x, freqs_cis))
        if self.reads_top_k(cache):
            out = self.attend_top_k(q_nope, q_pe, *self.top_k_latents(x, c_q, freqs_cis, new, cache))
            return self.o_proj(out.reshape(B, S, -1))
        mask = None
        if cache is not None:
            new, mask = cache.update(self.layer_id, *new)
        c_kv, k_pe = new[:2]
        if self.indexer is not None:
            index_scores, mask = self.select_tokens(x, c_q, freqs_cis, new[2], mask)
        impl = "absorb" if cache is not None and cache.absorb and self.absorbable() else self.impl
        attend = {"sdpa": self.attend_sdpa, "naive": self.attend_naive, "absorb": self.attend_absorbed}[impl]
        out = attend(q_nope, q_pe, c_kv, k_pe, mask)
        if self.indexer is not None:
            self.indexer.indexer_loss = self.indexer.kl = None
            if self.training and self.indexer.loss_coef > 0:  # coef 0: no target to compute
                probs = self.attention_probs(q_nope, q_pe, c_kv, k_pe, mask)
                self.indexer.learn(index_scores, probs, self._allowed(mask, S, c_kv.shape[1], x.device),
                                   getattr(cache, "token_mask", None))
        return self.o_proj(out.reshape(B, S, -1))


def per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B,S,H,a], w [H,a,c] -> [B,S,H,c]: each head through its own matrix, one bmm."""
    B, S, H, a = x.shape
    return torch.bmm(x.permute(2, 0, 1, 3).reshape(H, B * S, a), w).view(H, B, S, -1).permute(1, 2, 0, 3)


def over_keys(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B,S,H,a] (every head's queries of a sequence), y [B,a,c] (the sequence's keys,
    shared by the heads) -> [B,S,H,c], one bmm over B."""
    B, S, H, a = x.shape
    return torch.bmm(x.reshape(B, S * H, a), y).view(B, S, H, -1)


def gather_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows [B,T,d], idx [B,S,k] positions -> [B,S,k,d]: each query's own rows."""
    B, S, k = idx.shape
    flat = idx.reshape(B, S * k, 1).expand(-1, -1, rows.shape[-1])
    return rows.gather(1, flat).view(B, S, k, -1)


class GQA(nn.Module):
    """Baseline attention with per-head keys and values: MHA (kv_heads = heads), GQA, MQA
    (kv_heads = 1). Same head sizes as MLA (RoPE on the last qk_rope_head_dim dims), so a
    benchmark compares cache layouts, not head shapes. The cache holds k and v per kv head."""

    def __init__(self, cfg: ModelConfig, layer_id: int, impl: str = "sdpa"):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.kv_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.qk_head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def _rope(self, x, freqs_cis):
        nope, pe = x.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([nope, apply_rotary_emb(pe, freqs_cis)], dim=-1)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: Cache | None = None):
        B, S, _ = x.shape
        q = self._rope(self.q_proj(x).view(B, S, self.n_heads, self.qk_head_dim), freqs_cis)
        k = self._rope(self.k_proj(x).view(B, S, self.n_kv_heads, self.qk_head_dim), freqs_cis)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.v_head_dim)
        mask = None
        if cache is not None:
            (k, v), mask = cache.update(self.layer_id, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1), is_causal=mask is None,
            scale=self.softmax_scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


def build_attention(cfg: ModelConfig, layer_id: int) -> nn.Module:
    return MLA(cfg, layer_id) if cfg.attention_type == "mla" else GQA(cfg, layer_id)
