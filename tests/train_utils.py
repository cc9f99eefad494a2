"""Shared pieces of the training tests: a micro model and a small corpus, so that a
training step takes milliseconds and a whole run a few seconds."""

from __future__ import annotations

from pathlib import Path

from nanoseek.config import ModelConfig


def micro_config(**overrides) -> ModelConfig:
    """Every V3 feature on (q-LoRA, groups, a shared expert, a dense first layer, MTP),
    with a vocabulary a byte-level BPE can fill (256 bytes + specials + merges)."""
    base = dict(
        vocab_size=384, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(overrides)
    return ModelConfig(**base)


def small_corpus(n_docs: int = 60) -> list[str]:
    from nanoseek.data import default_corpus
    return default_corpus()[:n_docs]


def write_corpus(path: Path, n_docs: int = 60) -> Path:
    path.write_text("\n\n".join(small_corpus(n_docs)) + "\n")
    return path


