"""DeepSeek-VL's config.json read into nanoseek's terms: the text side as a ModelConfig, the vision side as transformers' SigLIP config.

A DeepSeek-VL checkpoint (transformers' `DeepseekVLConfig`, model_type "deepseek_vl") nests a
`text_config` (model_type "llama" by default: DeepSeek-VL 1.3B/7B are DeepSeek-LLM, Llama's
architecture) and a `vision_config` (model_type "siglip_vision_model"). The language model is
nanoseek's own transformer, so the text config must say a model nanoseek builds:

- a Llama config maps to the dense baseline (attention_type mha / gqa / mqa, every layer a
  SwiGLU MLP) when its math is nanoseek's: RMSNorm, SiLU gate, no attention or MLP bias, plain
  RoPE over the whole head (rope_type "default"). RoPE pairs differ in layout only (Llama
  rotates (i, i + d/2), nanoseek (2i, 2i + 1)); the checkpoint code permutes q/k rows, which
  leaves every q·k unchanged. Anything else (biases, llama3 / linear / dynamic RoPE, another
  activation, pretraining_tp > 1) is refused by name;
- a DeepSeek-V2/V3 config (MLA, DeepSeekMoE) reads through ModelConfig as any other.

The dict as read is kept (`raw`): saving writes it back, so transformers reads what it wrote.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from nanoseek.config import ConfigError, ModelConfig

MODEL_TYPE = "deepseek_vl"
ARCHITECTURE = "DeepseekVLForConditionalGeneration"
DEFAULT_IMAGE_TOKEN_ID = 100015  # transformers' DeepseekVLConfig default (<image_placeholder>)
TEXT_MODEL_TYPES = ("llama", "deepseek_v2", "deepseek_v3")
VISION_MODEL_TYPES = ("siglip_vision_model",)
TOP_KEYS = {"architectures", "model_type", "text_config", "vision_config", "image_token_id",
            "tie_word_embeddings", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
            "pad_token_id", "bos_token_id", "eos_token_id", "use_cache", "return_dict",
            "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
            "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class"}
# Llama keys that carry nothing nanoseek's model needs (or only training-time dropout, 0 at inference)
LLAMA_IGNORED = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                 "use_cache", "attention_dropout", "initializer_range", "_name_or_path",
                 "tie_word_embeddings", "output_hidden_states", "output_attentions", "return_dict",
                 "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
                 "problem_type", "tokenizer_class"}
# Llama keys whose value must be this one for the math to be nanoseek's baseline
LLAMA_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
LLAMA_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "bos_token_id",
                "eos_token_id", "pad_token_id"}


@dataclass
class VLConfig:
    """What the VL model is built from: the language model's ModelConfig, SigLIP's config,
    the placeholder token images replace, and whether lm_head shares embed_tokens' weight."""
    text: ModelConfig
    vision: PretrainedConfig
    image_token_id: int
    tie_word_embeddings: bool
    text_model_type: str
    raw: dict[str, Any]

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes: one per SigLIP patch, (image_size / patch_size)^2
        (576 for DeepSeek-VL's 384 px, patch 16)."""
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def rope_layout_permuted(self) -> bool:
        """Llama checkpoints store q/k rows in rotate-half order; nanoseek rotates pairs."""
        return self.text_model_type == "llama"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VLConfig:
        """A DeepSeek-VL config.json dict -> VLConfig; what nanoseek cannot build is refused."""
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
        unknown = sorted(set(d) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown DeepSeek-VL config field(s) {unknown}")
        text = dict(d.get("text_config") or {"model_type": "llama"})
        text_type = text.get("model_type", "llama")
        if text_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"{source}: text_config.model_type {text_type!r} is not one nanoseek builds "
                              f"(it builds {TEXT_MODEL_TYPES})")
        src = f"{source} text_config"
        text_cfg = (ModelConfig.from_dict(llama_fields(text, src), src) if text_type == "llama"
                    else ModelConfig.from_dict(text, src))
        if text_cfg.arch != "v3":
            raise ConfigError(f"{src}: arch {text_cfg.arch!r}: DeepSeek-VL's language model is built "
                              "as Llama or DeepSeek-V2/V3 only")
        # transformers' DeepseekV3Config says 1 MTP layer by default but builds (and saves) none
        text_cfg = text_cfg.replace(num_nextn_predict_layers=0)
        vision = dict(d.get("vision_config") or {"model_type": "siglip_vision_model"})
        vision.setdefault("model_type", "siglip_vision_model")
        if vision["model_type"] not in VISION_MODEL_TYPES:
            raise ConfigError(f"{source}: vision_config.model_type {vision['model_type']!r}: DeepSeek-VL's "
                              f"tower is SigLIP ({VISION_MODEL_TYPES})")
        vision_cfg = AutoConfig.for_model(**vision)
        image_token_id = d.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)
        if not isinstance(image_token_id, int) or not 0 <= image_token_id < text_cfg.vocab_size:
            raise ConfigError(f"{source}: image_token_id {image_token_id!r} is not a token of the "
                              f"vocabulary (vocab_size {text_cfg.vocab_size})")
        raw = copy.deepcopy(d)
        raw.setdefault("architectures", [ARCHITECTURE])
        return cls(text_cfg, vision_cfg, image_token_id, bool(d.get("tie_word_embeddings", True)),
                   text_type, raw)

    def to_dict(self) -> dict[str, Any]:
        """The config.json to write: the dict as read (transformers' DeepseekVLConfig)."""
        return copy.deepcopy(self.raw)


def llama_fields(t: dict[str, Any], source: str) -> dict[str, Any]:
    """A Llama text_config -> ModelConfig keyword arguments for the dense MHA/GQA/MQA baseline,
    or a ConfigError naming the first field whose math nanoseek does not have."""
    for key, want in LLAMA_REQUIRED.items():
        if key in t and t[key] is not None and t[key] != want:
            raise ConfigError(f"{source}: '{key}' is {t[key]!r}; nanoseek's dense baseline maps Llama "
                              f"with {key}={want!r} only")
    unknown = sorted(set(t) - LLAMA_FIELDS - LLAMA_IGNORED - set(LLAMA_REQUIRED))
    if unknown:
        raise ConfigError(f"{source}: Llama field(s) {unknown} have no counterpart in nanoseek's model")
    H = t.get("num_attention_heads", 32)
    kvh = t.get("num_key_value_heads") or H
    hidden = t.get("hidden_size", 4096)
    head_dim = t.get("head_dim") or hidden // H
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", t.get("rope_theta", 10000.0))
    if rope_type != "default" or rope:
        raise ConfigError(f"{source}: RoPE {rope_type!r} {rope or ''}: nanoseek maps Llama's plain RoPE "
                          "(rope_type 'default') only")
    attention_type = "mha" if kvh == H else "mqa" if kvh == 1 else "gqa"
    return dict(
        vocab_size=t.get("vocab_size", 32000), hidden_size=hidden,
        intermediate_size=t.get("intermediate_size", 11008), num_hidden_layers=t.get("num_hidden_layers", 32),
        num_attention_heads=H, num_key_value_heads=kvh, attention_type=attention_type,
        qk_nope_head_dim=0, qk_rope_head_dim=head_dim, v_head_dim=head_dim,
        n_routed_experts=None, num_experts_per_tok=None, n_shared_experts=0, first_k_dense_replace=0,
        rope_theta=theta, rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        bos_token_id=t.get("bos_token_id", 1), eos_token_id=t.get("eos_token_id", 2),
        pad_token_id=t.get("pad_token_id"))
