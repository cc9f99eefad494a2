"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 §2.1) and its KL training loss.

The indexer scores every preceding token s for the query token t with a few small ReLU heads,
    I_{t,s} = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s)                                    (V3.2 eq. 1)
    q_{t,j} = W_qb^j c_Q,t     (c_Q: MLA's q_a_layernorm output, shared with the main queries)
    k_s     = LayerNorm(W_k h_s)   (one key per token, shared by the heads: cached like c_KV)
    w_{t,j} = W_w^j h_t
and attention keeps only the top-k scoring keys per query, S_t = {s | I_{t,s} ∈ Top-k(I_{t,:})}
(eq. 2). As in DeepSeek's reference (V3.2-Exp inference/model.py, class Indexer) RoPE rotates
the FIRST qk_rope_head_dim dims of q and k in the non-interleaved (half-split) layout, pairs
(x_i, x_{i+d/2}), unlike the main MLA's interleaved pairs, and the scale is
w · H_I^-1/2 · d_I^-1/2, applied after the ReLU (positive, so it commutes with it).

The reference also rotates q and k by a Hadamard matrix and scores in FP8 (act_quant +
fp8_index). The rotation is orthogonal, (Hq)·(Hk) = q·k, and exists only to spread outliers
before quantising; FP8 is a precision choice. Both are left out: scores are computed in fp32
(as transformers does).

Training (V3.2 §2.1.1), one loss per layer, L_I:
  * dense warm-up (`indexer_mode="dense"`): attention stays dense; the target p_t is the main
    attention summed over heads and L1-normalised (detached), and
        L_I = Σ_t KL(p_{t,:} || Softmax(I_{t,:}));
  * sparse training (`indexer_mode="sparse"`): attention is restricted to S_t and
        L_I = Σ_t KL(p_{t,S_t} || Softmax(I_{t,S_t})).
The indexer's inputs (h and c_Q) are detached, so it learns only from L_I and the main model
only from the LM loss (top-k selection passes no gradient either). nanoseek divides the
paper's Σ_t by the number of query tokens, so `indexer_loss_coef` does not depend on batch
or sequence length. The paper freezes the main model during the warm-up:
`freeze_all_but_indexers`. V4's CSA indexer (model/v4/indexer.py) keeps this recipe and this
code: both indexers train through `IndexerTraining`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def apply_rotary_emb_half(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B,S,H,d] rotated on the pairs (x_i, x_{i+d/2}) by freqs_cis [B,S,d/2] (the
    non-interleaved layout: the reference's apply_rotary_emb(..., interleaved=False))."""
    x1, x2 = x.float().chunk(2, dim=-1)
    y = torch.complex(x1, x2) * freqs_cis.unsqueeze(-2)
    return torch.cat([y.real, y.imag], dim=-1).to(x.dtype)


def causal_mask(S: int, T: int, device) -> torch.Tensor:
    """[1, S, T] bool, True = may attend: the last S of T positions, each seeing itself and before."""
    return torch.ones(S, T, dtype=torch.bool, device=device).tril(T - S)[None]


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., T] -> [..., k] long: the positions of the k highest scores of each row, in
    ascending order (what decode gathers: V3.2 eq. 2's S_t).

    Ties at the k-th score go to the earliest tokens. torch.topk (the reference's and
    transformers' choice) leaves ties to the kernel, and a row scored during decoding then
    picks differently from the same row inside a full forward; ReLU makes exact ties (I = 0
    when every head's q·k <= 0) common with few heads. Every row keeps exactly k positions,
    so the chosen ones, read off in row-major order, reshape to [..., k]; a NaN score (a
    broken model: its logits turn non-finite anyway) counts as -inf so that this holds."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    return chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B,S,T] -> [B,S,T] bool, True at `top_k_indices(scores, k)`: the masked
    (prefill) and the gathered (decode) paths select through the one function."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_k_indices(scores, k), True)


class IndexerTraining:
    """What V3.2's lightning indexer and V4's CSA indexer (model/v4/indexer.py) share: the
    warm-up switch and the KL loss (module docstring). A mixin beside nn.Module; the indexer
    calls `init_training(cfg)` in its __init__.

    One switch, `mode` (cfg.indexer_mode): "dense" (the warm-up) lets every query read every
    key it may see, and so does a row with no more than `index_topk` of them (`attends_all`);
    otherwise attention reads the indexer's top-k, S_t."""

    def init_training(self, cfg: ModelConfig) -> None:
        self.mode, self.index_topk, self.loss_coef = cfg.indexer_mode, cfg.index_topk, cfg.indexer_loss_coef
        self.indexer_loss: torch.Tensor | None = None  # coef · L_I of the last training forward
        self.kl: torch.Tensor | None = None  # L_I without the coefficient, detached, for logging

    def attends_all(self, n_keys: int) -> bool:
        """Whether attention reads every key a query may see (no top-k selection)."""
        return self.mode == "dense" or n_keys <= self.index_topk

    def learn(self, scores: torch.Tensor, probs: torch.Tensor, allowed: torch.Tensor,
              token_mask: torch.Tensor | None = None) -> None:
        """Set `indexer_loss` = coef · mean_t KL(p_t || Softmax(I_t)) over the `allowed` keys
        (every key a query may see in the dense warm-up, S_t in sparse training); probs
        [B,S,H,T] is the main attention (the target, detached; fp32). token_mask [B,S] leaves
        padding queries out."""
        kl = indexer_kl_divergence(scores, probs.detach(), allowed)
        if token_mask is None:
            loss = kl.mean()
        else:
            loss = (kl * token_mask).sum() / token_mask.sum().clamp(min=1)
        self.kl = loss.detach()
        self.indexer_loss = self.loss_coef * loss


def indexer_kl_divergence(scores: torch.Tensor, probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """KL(p_t || Softmax(I_t)) per query [B,S], both restricted to the allowed keys [B,S,T]:
    p_t = Σ_heads probs [B,S,H,T], L1-normalised over the allowed keys. A query with no
    allowed key (a V4 query before the first compressed entry closes) scores 0."""
    rows = allowed.any(-1, keepdim=True)
    p = probs.float().sum(2).masked_fill(~allowed, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    # Rows without allowed keys get finite logits, so no NaN reaches the backward pass.
    logits = scores.masked_fill(~allowed, float("-inf")).masked_fill(~rows, 0.0)
    log_q = F.log_softmax(logits, dim=-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


class LightningIndexer(IndexerTraining, nn.Module):
    """I_{t,s} for the queries against every cached key; names as transformers'
    DeepseekV32Indexer (`self_attn.indexer.wq_b`, `.wk`, `.k_norm`, `.weights_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.q_lora_rank is None:
            raise ValueError("q_lora_rank is None: the lightning indexer reads MLA's q-LoRA latent c_Q")
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_head_dim = cfg.qk_rope_head_dim
        self.init_training(cfg)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        pe, nope = x.split([self.rope_head_dim, self.head_dim - self.rope_head_dim], dim=-1)
        return torch.cat([apply_rotary_emb_half(pe, freqs_cis), nope], dim=-1)

    def keys(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """h [B,S,D] -> k [B,S,d_I], what the cache stores beside c_KV and k_pe."""
        k = self.k_norm(self.wk(x.detach()))
        return self._rope(k.unsqueeze(2), freqs_cis).squeeze(2)

    def forward(self, x: torch.Tensor, c_q: torch.Tensor, freqs_cis: torch.Tensor,
                k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [B,S,D], c_Q [B,S,q_lora_rank], cached keys k [B,T,d_I], mask [B|1,S,T] (True =
        may attend) -> I [B,S,T] in fp32, -inf where the mask forbids."""
        B, S, _ = x.shape
        x, c_q = x.detach(), c_q.detach()
        q = self._rope(self.wq_b(c_q).view(B, S, self.n_heads, self.head_dim), freqs_cis)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float()
        w = w * (self.n_heads ** -0.5 * self.softmax_scale)
        logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
        scores = torch.einsum("bsht,bsh->bst", logits, w)
        return scores.masked_fill(~mask, float("-inf"))

    def select(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S_t as a mask: the top min(index_topk, T) allowed keys of each query."""
        k = min(self.index_topk, scores.shape[-1])
        return top_k_mask(scores, k) & mask

    def top_k(self, scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S_t as positions, for decode's gather: (idx [B,S,k] long, valid [B,S,k] bool).
        k = min(index_topk, T), or T when attention reads every key (`attends_all`). A row
        that may see fewer than k keys also gets forbidden positions (scored -inf), which
        `valid` marks False: the set {idx | valid} is exactly `select`'s mask."""
        B, S, T = scores.shape
        if self.attends_all(T):
            idx = torch.arange(T, device=scores.device).expand(B, S, T)
        else:
            idx = top_k_indices(scores, self.index_topk)
        return idx, mask.expand(B, S, T).gather(-1, idx)


def indexers(model: nn.Module) -> list[nn.Module]:
    """Every lightning indexer of the model: V3.2's (LightningIndexer) and V4's CSA indexers
    (model/v4/indexer.py), both trained through IndexerTraining."""
    return [m for m in model.modules() if isinstance(m, IndexerTraining)]


def indexer_loss(model: nn.Module) -> torch.Tensor | None:
    """Σ over layers of coef · L_I from the last training forward (None when none ran)."""
    losses = [m.indexer_loss for m in indexers(model) if m.indexer_loss is not None]
    return torch.stack(losses).sum() if losses else None


def indexer_kl(model: nn.Module) -> float | None:
    """The mean over layers of L_I (no coefficient) from the last training forward, to log."""
    kls = [m.kl for m in indexers(model) if m.kl is not None]
    return torch.stack(kls).mean().item() if kls else None


def set_indexer_mode(model: nn.Module, mode: str) -> None:
    """Every indexer's switch: "dense" (the warm-up: attention reads every key) or "sparse"."""
    for m in indexers(model):
        m.mode = mode


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every lightning indexer (what the dense warm-up trains)."""
    return [p for m in indexers(model) for p in m.parameters()]


def freeze_all_but_indexers(model: nn.Module) -> list[nn.Parameter]:
    """The dense warm-up's setting (V3.2 §2.1.1): every parameter frozen except the lightning
    indexers'. Returns the indexers' parameters (what the optimizer should hold)."""
    model.requires_grad_(False)
    params = indexer_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params
