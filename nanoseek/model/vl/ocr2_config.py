"""DeepSeek-OCR-2's config.json, read into nanoseek's ModelConfig (the language side) and the
vision side's own sections, with every field that does not map refused by name.

DeepSeek-OCR-2 (transformers' `deepseek_ocr2`) is a DeepSeekMoE language model with plain
multi-head attention (DeepSeek-V2's MoE, no MLA) fed by DeepEncoder V2: SAM ViT-B with a 16x
convolutional token compressor, then a small Qwen2-style decoder used as an encoder with
learnable "causal flow" queries. The language side maps onto nanoseek's transformer:
  * attention: attention_type "mha" (or "gqa"), qk_nope_head_dim 0, qk_rope_head_dim = v_head_dim
    = head_dim (rope on the whole head, no q/k norm, no bias), plain q_proj (no q-LoRA);
  * rope: transformers rotates halves (rotate_half), nanoseek rotates consecutive pairs, so
    the q/k rows are permuted per head on load and back on save (model/vl/ocr2_weights.py);
  * MoE: softmax gating, greedy or group-limited top-k, weights not renormalised
    (norm_topk_prob false), times routed_scaling_factor; shared experts; the dense layers
    (mlp_layer_types "dense") must come first (first_k_dense_replace).
Refused: attention or MLP biases, tied embeddings, rope scaling, a sliding window in the
vision encoder, a hidden activation other than SiLU, dense layers after sparse ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from nanoseek.config import ConfigError, ModelConfig

MODEL_TYPE = "deepseek_ocr2"
ARCHITECTURE = "DeepseekOcr2ForConditionalGeneration"


@dataclass
class OCR2Config:
    """The language side as a ModelConfig; the vision side's two sections as transformers
    reads them (its SAM and encoder modules are built from them); the raw config to write back."""

    text: ModelConfig
    sam: dict
    encoder: dict
    image_token_id: int
    raw: dict = field(repr=False)

    @property
    def vision_dim(self) -> int:
        """Width of the vision tokens before the projector (the encoder's hidden size)."""
        return self.encoder["hidden_size"]


def _refuse(cond: bool, name: str, msg: str) -> None:
    if cond:
        raise ConfigError(f"DeepSeek-OCR-2 config field '{name}': {msg} (not supported by nanoseek)")


def text_config(t: dict) -> ModelConfig:
    """transformers' DeepseekOcr2TextConfig fields -> ModelConfig, or a ConfigError naming the field."""
    _refuse(bool(t.get("attention_bias")), "text_config.attention_bias", "attention with biases")
    _refuse(bool(t.get("mlp_bias")), "text_config.mlp_bias", "MLPs with biases")
    _refuse(t.get("hidden_act", "silu") != "silu", "text_config.hidden_act", f"{t.get('hidden_act')!r}, not silu")
    _refuse(bool(t.get("tie_word_embeddings")), "text_config.tie_word_embeddings", "tied embeddings")
    rope = t.get("rope_parameters") or {}
    _refuse(rope.get("rope_type", "default") != "default", "text_config.rope_parameters",
            f"rope_type {rope.get('rope_type')!r} (only the default rope maps)")
    heads, hidden = t["num_attention_heads"], t["hidden_size"]
    head_dim = hidden // heads
    _refuse(t.get("head_dim") not in (None, head_dim), "text_config.head_dim",
            f"{t.get('head_dim')} != hidden_size / num_attention_heads = {head_dim}")
    kv = t.get("num_key_value_heads") or heads
    kinds = t.get("mlp_layer_types")
    _refuse(kinds is None, "text_config.mlp_layer_types", "missing (transformers needs it per layer)")
    n_dense = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    _refuse(any(k != "sparse" for k in kinds[n_dense:]), "text_config.mlp_layer_types",
            f"{kinds}: only 'dense' layers followed by 'sparse' ones map (first_k_dense_replace)")
    _refuse(len(kinds) != t["num_hidden_layers"], "text_config.mlp_layer_types",
            f"{len(kinds)} entries for {t['num_hidden_layers']} layers")
    return ModelConfig(
        vocab_size=t["vocab_size"], hidden_size=hidden, intermediate_size=t["intermediate_size"],
        moe_intermediate_size=t["moe_intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=heads, attention_type="mha" if kv == heads else "gqa",
        num_key_value_heads=None if kv == heads else kv,
        q_lora_rank=None, kv_lora_rank=head_dim, qk_nope_head_dim=0, qk_rope_head_dim=head_dim,
        v_head_dim=head_dim,
        n_routed_experts=t["n_routed_experts"] if n_dense < len(kinds) else None,
        n_shared_experts=t.get("n_shared_experts") or 0, num_experts_per_tok=t.get("num_experts_per_tok"),
        n_group=t.get("n_group") or 1, topk_group=t.get("topk_group") or 1,
        first_k_dense_replace=n_dense, routed_scaling_factor=t.get("routed_scaling_factor", 1.0),
        scoring_func="softmax", topk_method=t.get("topk_method") or "greedy", norm_topk_prob=False,
        rope_theta=rope.get("rope_theta", 10000.0), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position_embeddings=t["max_position_embeddings"], bos_token_id=t.get("bos_token_id"),
        eos_token_id=t.get("eos_token_id"), pad_token_id=t.get("pad_token_id"),
        initializer_range=t.get("initializer_range", 0.02))


def from_hf_json(raw: dict) -> OCR2Config:
    """A DeepSeek-OCR-2 config.json (as transformers writes it) -> OCR2Config."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"config.json: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    _refuse(bool(raw.get("tie_word_embeddings")), "tie_word_embeddings", "tied embeddings")
    vision = raw.get("vision_config") or {}
    sam, enc = copy.deepcopy(vision.get("sam_config") or {}), copy.deepcopy(vision.get("encoder_config") or {})
    _refuse(not sam or not enc, "vision_config", "needs both sam_config and encoder_config")
    _refuse(bool(enc.get("use_sliding_window")), "vision_config.encoder_config.use_sliding_window",
            "a sliding window in the vision encoder")
    _refuse(enc.get("hidden_act", "silu") != "silu", "vision_config.encoder_config.hidden_act",
            f"{enc.get('hidden_act')!r}, not silu")
    channels = (sam.get("downsample_channels") or [512, 896])[-1]
    _refuse(channels != enc["hidden_size"], "vision_config.sam_config.downsample_channels",
            f"last entry {channels} must equal encoder_config.hidden_size {enc['hidden_size']}")
    text = text_config(raw["text_config"])
    image_token_id = raw.get("image_token_id", 128815)
    _refuse(not 0 <= image_token_id < text.vocab_size, "image_token_id",
            f"{image_token_id} is outside the vocabulary (vocab_size {text.vocab_size})")
    return OCR2Config(text=text, sam=sam, encoder=enc, image_token_id=image_token_id, raw=copy.deepcopy(raw))
