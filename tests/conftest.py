"""Shared fixtures: tiny configs that switch every V3 feature on, in a few hundred KB."""

import pytest
import torch

from nanoseek.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """2 layers (dense + MoE), q-LoRA, 8 experts in 4 groups keep 2, a shared expert,
    YaRN, one MTP layer. Small enough for many forwards per test."""
    base = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, num_nextn_predict_layers=1,
        max_position_embeddings=256, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    )
    base.update(overrides)
    return ModelConfig(**base)


def v2_config(**overrides) -> ModelConfig:
    """V2-style: softmax routing, group-limited greedy, no q-LoRA, no MTP."""
    base = dict(q_lora_rank=None, scoring_func="softmax", topk_method="group_limited_greedy",
                norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                rope_scaling=None)
    return tiny_config(**{**base, **overrides})


def randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that routing, attention and logits are far from uniform, and a
    random correction bias, so parity tests exercise every branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (use it with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    one thread is fastest, and immune to a crowded machine's thread contention (which can
    make 2-thread runs 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
