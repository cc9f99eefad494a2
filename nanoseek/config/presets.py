"""Named configurations: the published DeepSeek-V2, V2-Lite, V3, V3.2, V4-Flash and V4-Pro, and the CPU-sized `tiny`, `tiny-v32` and `tiny-v4`."""

from __future__ import annotations

from typing import Any

from nanoseek.config.errors import ConfigError
from nanoseek.config.model_config import ModelConfig

_YARN_40 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-trainable, every V3 feature on: q-LoRA, 4 groups keep 2, a shared expert,
    # a first dense layer, one MTP layer.
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, num_nextn_predict_layers=1,
        max_position_embeddings=1024, rope_theta=10000.0, bos_token_id=0, eos_token_id=1,
        pad_token_id=2),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={**_YARN_40, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001),
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        first_k_dense_replace=1, routed_scaling_factor=16.0, scoring_func="softmax",
        topk_method="group_limited_greedy", norm_topk_prob=False, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={**_YARN_40, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.003),
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        first_k_dense_replace=3, routed_scaling_factor=2.5, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, num_nextn_predict_layers=1,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={**_YARN_40, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, aux_loss_alpha=0.0001),
}


_V32_INDEXER = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
PRESETS["deepseek-v3.2"] = dict(PRESETS["deepseek-v3"], arch="v32", **_V32_INDEXER)


def _alternate(n: int, first: list[str], a: str, b: str) -> list[str]:
    """`first`, then a, b, a, b, ... up to n layers."""
    return (first + [a if i % 2 == 0 else b for i in range(n - len(first))])[:n]


_SW, _CSA, _HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_V4_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
            "beta_fast": 32, "beta_slow": 1}
_V4_COMMON = dict(
    arch="v4", vocab_size=129280, num_nextn_predict_layers=1, head_dim=512, qk_rope_head_dim=64,
    sliding_window=128, compress_rate_csa=4, compress_rate_hca=128, index_n_heads=64,
    index_head_dim=128, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, n_shared_experts=1,
    num_experts_per_tok=6, scoring_func="sqrtsoftplus", norm_topk_prob=True, swiglu_limit=10.0,
    rope_theta=10000.0, compress_rope_theta=160000.0, rope_scaling=_V4_YARN,
    max_position_embeddings=1048576, mtp_layer_type=_SW, bos_token_id=0, eos_token_id=1,
    aux_loss_alpha=0.0001)
# V4-Flash: two sliding-window layers, then CSA and HCA alternating (DeepSeek's compress_ratios
# 0, 0, 4, 128, 4, 128, ...); V4-Pro: two HCA layers, then CSA and HCA alternating (128, 128,
# 4, 128, 4, ...: 30 CSA, 31 HCA; transformers' default schedule starts the alternation with
# HCA instead). Three hash-routed MoE layers first in both.
PRESETS["deepseek-v4-flash"] = dict(
    _V4_COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024,
    o_groups=8, o_lora_rank=1024, index_topk=512, n_routed_experts=256, moe_intermediate_size=2048,
    intermediate_size=2048, routed_scaling_factor=1.5,
    layer_types=_alternate(43, [_SW, _SW], _CSA, _HCA),
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40)
PRESETS["deepseek-v4-pro"] = dict(
    _V4_COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
    o_groups=16, o_lora_rank=1024, index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
    intermediate_size=3072, routed_scaling_factor=2.5,
    layer_types=_alternate(61, [_HCA, _HCA], _CSA, _HCA),
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58)
# CPU presets in which every new piece occurs, with windows small enough that a 200-token
# sequence crosses many of them. The indexers get 16 (V3.2) and 8 (V4) heads: a score
# Σ_h w·ReLU(q·k) is exactly 0 when every head's q·k <= 0, and with few heads such ties at the
# top-k cut-off are common enough that the selection becomes a matter of tie-breaking.
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], arch="v32", index_n_heads=16, index_head_dim=32,
                           index_topk=64)
PRESETS["tiny-v4"] = dict(
    arch="v4", vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    head_dim=64, qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64,
    sliding_window=16, compress_rate_csa=4, compress_rate_hca=16, compress_rope_theta=160000.0,
    layer_types=[_SW, _CSA, _HCA, _CSA], mtp_layer_type=_SW, index_n_heads=8, index_head_dim=32,
    index_topk=16, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=128,
    routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", norm_topk_prob=True,
    swiglu_limit=10.0, num_nextn_predict_layers=1, max_position_embeddings=4096,
    rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, optionally with some fields changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
