"""FLOPs per token, forward and backward, and the compute of a training run.

Conventions (the usual ones of Kaplan et al. and the PaLM MFU appendix):
  * a multiply-add is 2 FLOPs, so a matmul weight used by a token costs 2 FLOPs per
    parameter: forward matmul FLOPs = 2 x activated matmul parameters (attention
    projections, router, shared + the chosen routed experts, output head; V3.2's and V4's
    indexer projections, V4's compressors and mHC mappings). The embedding lookup is not a
    matmul and counts 0; norms, activations and softmax are ignored;
  * attention scores and the weighted sum of values, per layer per token attending to
    `ctx` positions, in the decompressed form used for training and prefill:
        2 * heads * (qk_head_dim + v_head_dim) * ctx
    (q.k over qk_head_dim, p.v over v_head_dim). A causal sequence of length S attends on
    average to S/2 positions, so training at length S uses ctx = S/2;
  * MLA's absorbed decode form (W_UK folded into q, W_UV into the output) scores against
    the latent instead: 2 * heads * (2 * kv_lora_rank + qk_rope_head_dim) * ctx; its
    projections cost the same 2 x parameters per token, so only this term changes;
  * V3.2 (DSA): the MLA attends to min(index_topk, ctx) positions, and the lightning
    indexer scores all ctx keys, I_t,s = sum_j w_t,j ReLU(q_t,j . k_s):
        2 * index_n_heads * (index_head_dim + 1) * ctx;
  * V4: one shared KV head of c = head_dim numbers is both key and value, so each entry a
    query attends to costs 4 * heads * c (scores and values); a query attends to
    min(ctx, n_win) window entries, plus min(index_topk, ctx // m) compressed entries in a
    CSA layer (its indexer scoring all ctx // m compressed keys) or all ctx // m' in an HCA
    layer; the mHC mixing (pre-collapse n·d, post n·d and comb n²·d multiply-adds per
    mapping, and the head's collapse) is counted, Sinkhorn's few n x n iterations are not;
  * causal training/prefill of V3.2 and V4 uses the exact mean over the S positions of the
    decode-form count (min(), floor() do not commute with a mean);
  * backward = 2 x forward (gradients for activations and for weights), so training
    = 3 x forward x tokens (6N per token plus attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.calc.params import matmul_params
from nanoseek.config import ConfigError, ModelConfig


# ------------------------------------------------------------ how many entries a query sees
def seen(ctx: float, m: int = 1, cap: int | None = None) -> float:
    """Entries a query at context ctx sees when every m tokens make one: floor(ctx / m),
    at most `cap`."""
    n = math.floor(ctx / m)
    return n if cap is None else min(cap, n)


def mean_seen(S: int, m: int = 1, cap: int | None = None) -> float:
    """The mean of seen(t, m, cap) over the positions t = 1..S of a causal sequence, in
    closed form: sum_{t<=N} floor(t/m) = m·q(q-1)/2 + q(r+1) with N = q·m + r."""
    def floor_sum(N: int) -> int:
        q, r = divmod(N, m)
        return m * q * (q - 1) // 2 + q * (r + 1)
    if cap is None:
        return floor_sum(S) / S
    full = max(0, S - cap * m + 1)  # positions that already see `cap` entries
    return (floor_sum(min(S, cap * m - 1)) + cap * full) / S


def _count(ctx: float, causal_mean: bool):
    """seen() at ctx, or its mean over a causal sequence of ctx tokens."""
    return (lambda m=1, cap=None: mean_seen(int(ctx), m, cap)) if causal_mean else \
        (lambda m=1, cap=None: seen(ctx, m, cap))


# ------------------------------------------------------------------ attention by architecture
def indexer_flops(cfg: ModelConfig, keys: float) -> float:
    """The lightning indexer scoring `keys` keys: n_I heads of q.k over c_I, then the
    ReLU'd scores weighted and summed over the heads."""
    return 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * keys


def mla_flops(cfg: ModelConfig, ctx: float, absorbed: bool) -> float:
    """One MLA layer attending to ctx positions (decompressed, or absorbed onto the latent)."""
    H = cfg.num_attention_heads
    if absorbed:
        if cfg.attention_type != "mla":
            raise ConfigError("the absorbed form exists only for attention_type='mla'")
        return 2 * H * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * ctx
    return 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * ctx


def v4_layer_flops(cfg: ModelConfig, layer_type: str, count) -> tuple[float, float]:
    """(core attention, indexer) FLOPs of one V4 layer, `count(m, cap)` giving entries seen."""
    m = cfg.compress_rate(layer_type)
    entries = count(1, cfg.sliding_window)
    indexer = 0.0
    if layer_type == "compressed_sparse_attention":
        entries += count(m, cfg.index_topk)
        indexer = indexer_flops(cfg, count(m))
    elif m:
        entries += count(m)
    return 4 * cfg.num_attention_heads * cfg.head_dim * entries, indexer


def attention_parts(cfg: ModelConfig, ctx: float, absorbed: bool = False, include_mtp: bool = False,
                    causal_mean: bool = False) -> dict[str, float]:
    """{"attention": core, "indexer": scoring} FLOPs of one token, all layers."""
    layers = range(cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0))
    count = _count(ctx, causal_mean)
    if cfg.is_v4:
        parts = [v4_layer_flops(cfg, cfg.layer_type(i), count) for i in layers]
        return {"attention": sum(a for a, _ in parts), "indexer": sum(b for _, b in parts)}
    if cfg.is_v32:
        cap = None if cfg.indexer_mode == "dense" else cfg.index_topk
        return {"attention": len(layers) * mla_flops(cfg, count(1, cap), absorbed),
                "indexer": len(layers) * indexer_flops(cfg, count(1))}
    return {"attention": len(layers) * mla_flops(cfg, ctx, absorbed), "indexer": 0.0}


def attention_flops_per_token(cfg: ModelConfig, ctx: float, absorbed: bool = False,
                              include_mtp: bool = False) -> float:
    """Score + value FLOPs of one token attending at context `ctx`, all layers, the
    indexer's scoring included (V3.2, V4)."""
    return sum(attention_parts(cfg, ctx, absorbed, include_mtp).values())


def train_attention_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = False) -> float:
    """Attention FLOPs per token of a causal sequence of seq_len tokens: V3 at ctx = S/2;
    V3.2 and V4 the exact mean over the positions."""
    if not (cfg.is_v32 or cfg.is_v4):
        return attention_flops_per_token(cfg, seq_len / 2, include_mtp=include_mtp)
    return sum(attention_parts(cfg, seq_len, False, include_mtp, causal_mean=True).values())


def mhc_flops_per_token(cfg: ModelConfig, include_mtp: bool = False) -> float:
    """V4's stream mixing outside the mapping's matmul: per mapping, the pre-collapse (n·d),
    post (n·d) and comb (n²·d) multiply-adds; two mappings per block, plus the head's collapse."""
    if not cfg.is_v4:
        return 0.0
    n, d = cfg.hc_mult, cfg.hidden_size
    blocks = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    heads = 1 + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return blocks * 2 * 2 * (2 * n + n * n) * d + heads * 2 * n * d


def token_flops(cfg: ModelConfig, ctx: float, include_mtp: bool = False) -> dict[str, float]:
    """One generated token's forward FLOPs at context ctx, by part: the matmuls, the core
    attention (absorbed for MLA), the indexer's scoring, the mHC mixing."""
    parts = attention_parts(cfg, ctx, absorbed=cfg.attention_type == "mla" and not cfg.is_v4,
                            include_mtp=include_mtp)
    return {"matmuls": 2.0 * matmul_params(cfg, include_mtp=include_mtp), **parts,
            "hyper_connections": mhc_flops_per_token(cfg, include_mtp)}


@dataclass
class FlopsReport:
    seq_len: int
    matmul_params: int  # activated, per token
    forward_matmul: float  # per token
    forward_attention_train: float  # per token, causal at seq_len (V3: ctx = seq_len / 2)
    forward_train: float  # per token
    backward_train: float  # per token
    train_per_token: float  # forward + backward
    train_tokens: float
    train_total: float  # train_per_token x tokens
    six_n_total: float  # 6 x activated matmul params x tokens, the attention-free estimate
    decode_ctx: int
    decode_forward: float  # one new token attending to decode_ctx positions, decompressed
    decode_forward_absorbed: float | None  # MLA's absorbed form
    include_mtp: bool
    forward_mhc: float = 0.0  # V4's stream mixing, per token (in forward_train and decode)


def flops_report(cfg: ModelConfig, seq_len: int = 4096, tokens: float = 1e12,
                 decode_ctx: int | None = None, include_mtp: bool = False) -> FlopsReport:
    if seq_len < 1 or not 0 < tokens < math.inf:
        raise ConfigError(f"seq_len and tokens must be positive, got {seq_len} and {tokens}")
    if decode_ctx is not None and decode_ctx < 1:
        raise ConfigError(f"decode context (--ctx) must be >= 1 token, got {decode_ctx}")
    decode_ctx = seq_len if decode_ctx is None else decode_ctx
    n = matmul_params(cfg, activated=True, include_mtp=include_mtp)
    fwd_mm = 2.0 * n
    mhc = mhc_flops_per_token(cfg, include_mtp)
    fwd_attn = train_attention_flops_per_token(cfg, seq_len, include_mtp)
    fwd = fwd_mm + fwd_attn + mhc
    absorbed = None
    if cfg.attention_type == "mla" and not cfg.is_v4:
        absorbed = fwd_mm + attention_flops_per_token(cfg, decode_ctx, absorbed=True, include_mtp=include_mtp)
    return FlopsReport(
        seq_len=seq_len, matmul_params=n, forward_matmul=fwd_mm, forward_attention_train=fwd_attn,
        forward_train=fwd, backward_train=2 * fwd, train_per_token=3 * fwd, train_tokens=tokens,
        train_total=3 * fwd * tokens, six_n_total=6.0 * n * tokens, decode_ctx=decode_ctx,
        decode_forward=fwd_mm + mhc + attention_flops_per_token(cfg, decode_ctx, include_mtp=include_mtp),
        decode_forward_absorbed=absorbed, include_mtp=include_mtp, forward_mhc=mhc)


def prefill_flops_per_token(cfg: ModelConfig, prompt_tokens: int) -> float:
    """Forward FLOPs per prompt token of a causal prefill (V3: ctx = prompt/2 on average)."""
    return (2.0 * matmul_params(cfg) + train_attention_flops_per_token(cfg, prompt_tokens)
            + mhc_flops_per_token(cfg))


def decode_flops_per_token(cfg: ModelConfig, ctx: float) -> float:
    """Forward FLOPs of one generated token attending at context ctx (absorbed for MLA)."""
    return sum(token_flops(cfg, ctx).values())


def to_dict(r: FlopsReport) -> dict:
    return asdict(r)
