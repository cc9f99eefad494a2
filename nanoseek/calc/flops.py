"""FLOPs per token, forward and backward, and the compute of a training run.

Conventions (the usual ones of Kaplan et al. and the PaLM MFU appendix):
  * a multiply-add is 2 FLOPs, so a matmul weight used by a token costs 2 FLOPs per
    parameter: forward matmul FLOPs = 2 x activated matmul parameters (attention
    projections, router, shared + the chosen routed experts, output head). The embedding
    lookup is not a matmul and counts 0; norms, activations and softmax are ignored;
  * attention scores and the weighted sum of values, per layer per token attending to
    `ctx` positions, in the decompressed form used for training and prefill:
        2 * heads * (qk_head_dim + v_head_dim) * ctx
    (q.k over qk_head_dim, p.v over v_head_dim). A causal sequence of length S attends on
    average to S/2 positions, so training at length S uses ctx = S/2;
  * MLA's absorbed decode form (W_UK folded into q, W_UV into the output) scores against
    the latent instead: 2 * heads * (2 * kv_lora_rank + qk_rope_head_dim) * ctx; its
    projections cost the same 2 x parameters per token, so only this term changes;
  * backward = 2 x forward (gradients for activations and for weights), so training
    = 3 x forward x tokens (6N per token plus attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.calc.params import matmul_params
from nanoseek.config import ConfigError, ModelConfig


def attention_flops_per_token(cfg: ModelConfig, ctx: float, absorbed: bool = False,
                              include_mtp: bool = False) -> float:
    """Score + value FLOPs of one token attending to `ctx` positions, all layers."""
    H = cfg.num_attention_heads
    if absorbed:
        if cfg.attention_type != "mla":
            raise ConfigError("the absorbed form exists only for attention_type='mla'")
        per_layer = 2 * H * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * ctx
    else:
        per_layer = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return per_layer * layers


@dataclass
class FlopsReport:
    seq_len: int
    matmul_params: int  # activated, per token
    forward_matmul: float  # per token
    forward_attention_train: float  # per token, causal at seq_len (ctx = seq_len / 2)
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


def flops_report(cfg: ModelConfig, seq_len: int = 4096, tokens: float = 1e12,
                 decode_ctx: int | None = None, include_mtp: bool = False) -> FlopsReport:
    if seq_len < 1 or not 0 < tokens < math.inf:
        raise ConfigError(f"seq_len and tokens must be positive, got {seq_len} and {tokens}")
    if decode_ctx is not None and decode_ctx < 1:
        raise ConfigError(f"decode context (--ctx) must be >= 1 token, got {decode_ctx}")
    decode_ctx = seq_len if decode_ctx is None else decode_ctx
    n = matmul_params(cfg, activated=True, include_mtp=include_mtp)
    fwd_mm = 2.0 * n
    fwd_attn = attention_flops_per_token(cfg, seq_len / 2, include_mtp=include_mtp)
    fwd = fwd_mm + fwd_attn
    absorbed = None
    if cfg.attention_type == "mla":
        absorbed = fwd_mm + attention_flops_per_token(cfg, decode_ctx, absorbed=True, include_mtp=include_mtp)
    return FlopsReport(
        seq_len=seq_len, matmul_params=n, forward_matmul=fwd_mm, forward_attention_train=fwd_attn,
        forward_train=fwd, backward_train=2 * fwd, train_per_token=3 * fwd, train_tokens=tokens,
        train_total=3 * fwd * tokens, six_n_total=6.0 * n * tokens, decode_ctx=decode_ctx,
        decode_forward=fwd_mm + attention_flops_per_token(cfg, decode_ctx, include_mtp=include_mtp),
        decode_forward_absorbed=absorbed, include_mtp=include_mtp)


def prefill_flops_per_token(cfg: ModelConfig, prompt_tokens: int) -> float:
    """Forward FLOPs per prompt token of a causal prefill (ctx = prompt/2 on average)."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, prompt_tokens / 2)


def decode_flops_per_token(cfg: ModelConfig, ctx: float) -> float:
    """Forward FLOPs of one generated token attending to ctx positions (absorbed for MLA)."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, ctx, absorbed=cfg.attention_type == "mla")


def to_dict(r: FlopsReport) -> dict:
    return asdict(r)
