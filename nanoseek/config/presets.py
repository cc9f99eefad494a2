"""Named configurations: the published DeepSeek-V2, V2-Lite and V3, and the CPU-sized `tiny`."""

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


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, optionally with some fields changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
