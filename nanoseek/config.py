"""ModelConfig: one dataclass for DeepSeek-V2, V2-Lite, V3 and nanoseek's own models.

Field names are the Hugging Face `DeepseekV3Config` names, so the `config.json` of a
published DeepSeek checkpoint, one written by transformers 5 (`rope_parameters`) and one
written by nanoseek all read the same way. Fields that only nanoseek uses (training
weights, the attention baseline) are written beside them; transformers ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# Keys that appear in published or transformers-written config.json files and carry no
# information nanoseek needs (or are derived). They are accepted and dropped.
IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "attention_dropout", "output_router_logits", "head_dim",
    "qk_head_dim", "ep_size", "moe_layer_freq", "rope_interleave", "quantization_config",
    "_name_or_path", "num_mtp_layers", "router_aux_loss_coef", "mlp_bias", "tie_word_embeddings",
    "attention_bias", "hidden_act", "initializer_range", "chunk_size_feed_forward",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "problem_type", "tokenizer_class", "is_encoder_decoder", "add_cross_attention",
}
# Ignored keys whose value must be this one for the architecture to be what nanoseek builds.
REQUIRED_VALUES = {
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "moe_layer_freq": 1, "rope_interleave": True,
}


# The rope_scaling keys nanoseek implements (transformers' YaRN keys, rope_theta aside: that
# one is moved to the top-level field on load). Any other key is refused, never dropped.
YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(ValueError):
    """A config field is unknown, missing or contradicts another one."""


@dataclass
class ModelConfig:
    # --- sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # --- MLA
    q_lora_rank: int | None = 1536  # None: a plain q_proj, as in V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE
    n_routed_experts: int | None = 256  # None: every layer dense
    n_shared_experts: int | None = 1  # null (as some configs say) is read as 0: none
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    first_k_dense_replace: int = 3
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    # --- MTP
    num_nextn_predict_layers: int = 0
    # --- position and norm
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", ...}
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # --- tokens
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # --- training (nanoseek; the V2/V3 configs carry aux_loss_alpha and seq_aux too)
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight α
    seq_aux: bool = True
    bias_update_speed: float = 0.001  # γ of the aux-loss-free bias update
    mtp_loss_weight: float = 0.3  # λ
    router_z_loss_coef: float = 0.0  # optional ST-MoE router z-loss
    initializer_range: float = 0.02
    # --- attention baseline (nanoseek): mla | mha | gqa | mqa
    attention_type: str = "mla"
    num_key_value_heads: int | None = None  # for gqa

    def __post_init__(self) -> None:
        if self.n_shared_experts is None:  # transformers' configs take an int; 0 means none
            self.n_shared_experts = 0
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers below first_k_dense_replace are dense; MTP layers follow the same rule."""
        return self.is_moe and layer_id >= self.first_k_dense_replace

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the attention baseline (MLA has one shared latent)."""
        return {"mha": self.num_attention_heads, "mqa": 1, "mla": 1}.get(
            self.attention_type, self.num_key_value_heads or self.num_attention_heads)

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token per layer by MLA: c_KV and the shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{name}': {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"RoPE rotates pairs, so it must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             f"must be null or positive, got {self.q_lora_rank!r}")
        need(self.attention_type in ATTENTION_TYPES, "attention_type",
             f"must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.attention_type == "gqa":
            kvh = self.num_key_value_heads
            need(kvh is not None and kvh > 0 and self.num_attention_heads % kvh == 0,
                 "num_key_value_heads",
                 f"gqa needs a divisor of num_attention_heads={self.num_attention_heads}, got {kvh!r}")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        need((self.topk_method == "noaux_tc") == (self.scoring_func == "sigmoid"), "topk_method",
             f"{self.topk_method!r} does not go with scoring_func={self.scoring_func!r} "
             "(noaux_tc is V3's sigmoid routing; greedy/group_limited_greedy are V2's softmax)")
        need(0 <= self.first_k_dense_replace, "first_k_dense_replace", "must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.is_moe:
            self._validate_moe(need)
        if self.rope_scaling is not None:
            self._validate_rope_scaling(need)

    def _validate_moe(self, need) -> None:
        E, k = self.n_routed_experts, self.num_experts_per_tok
        need(E > 0, "n_routed_experts", f"must be positive, got {E}")
        need(k is not None and 0 < k <= E, "num_experts_per_tok",
             f"must be in 1..n_routed_experts={E}, got {k!r}")
        need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        need((self.n_shared_experts or 0) >= 0, "n_shared_experts", "must be >= 0")
        G, tg = self.n_group or 1, self.topk_group or 1
        need(E % G == 0, "n_group", f"n_routed_experts={E} is not divisible by n_group={G}")
        need(0 < tg <= G, "topk_group", f"must be in 1..n_group={G}, got {tg}")
        need(tg * (E // G) >= k, "topk_group",
             f"topk_group={tg} groups of {E // G} experts cannot hold num_experts_per_tok={k}")
        if self.topk_method == "noaux_tc" and G > 1:
            need(E // G >= 2, "n_group", "V3 group scores sum the top-2 experts: groups need >= 2")

    def _validate_rope_scaling(self, need) -> None:
        rs = self.rope_scaling
        kind = rs.get("type", rs.get("rope_type"))
        need(kind in ("yarn", "default", None), "rope_scaling",
             f"only YaRN scaling is supported, got type {kind!r}")
        allowed = YARN_KEYS if kind == "yarn" else {"type", "rope_type"}
        unknown = sorted(set(rs) - allowed)
        need(not unknown, "rope_scaling",
             f"key(s) {unknown} are not implemented by nanoseek for type {kind!r} "
             f"(it implements {sorted(allowed)}); refusing rather than ignoring them")
        if kind == "yarn":
            need("factor" in rs and "original_max_position_embeddings" in rs, "rope_scaling",
                 "YaRN needs 'factor' and 'original_max_position_embeddings'")
            for key in ("factor", "original_max_position_embeddings"):
                need(_is_number(rs[key]) and rs[key] > 0, "rope_scaling",
                     f"YaRN's '{key}' must be a positive number, got {rs[key]!r}")
            af = rs.get("attention_factor")
            need(af is None or (_is_number(af) and af > 0), "rope_scaling",
                 f"'attention_factor' must be null or a positive number, got {af!r}")
            need(isinstance(rs.get("truncate", True), bool), "rope_scaling",
                 f"'truncate' must be true or false, got {rs.get('truncate')!r}")

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    # ------------------------------------------------------------------- json io
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        for key, want in REQUIRED_VALUES.items():
            if key in d and d[key] != want and d[key] is not None:
                raise ConfigError(f"{source}: config field '{key}' is {d[key]!r}; nanoseek "
                                  f"builds DeepSeek models with {key}={want!r}")
        if "scoring_func" not in d:  # transformers' V2 config omits it; V2 is softmax
            v2 = d.get("model_type") == "deepseek_v2"
            d.setdefault("topk_method", "greedy" if v2 else "noaux_tc")
            d["scoring_func"] = "sigmoid" if d["topk_method"] == "noaux_tc" else "softmax"
            if v2:
                d.setdefault("norm_topk_prob", False)
        if "rope_parameters" in d:  # transformers 5's name; rope_scaling wins there too
            rp = d.pop("rope_parameters")
            d["rope_scaling"] = d.get("rope_scaling") or rp
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            if "rope_theta" in rs:  # transformers: the rope dict's rope_theta wins
                d["rope_theta"] = rs.pop("rope_theta")
            rs["type"] = rs.pop("rope_type", rs.get("type"))
            d["rope_scaling"] = rs if rs["type"] not in (None, "default") or len(rs) > 1 else None
        if d.get("num_key_value_heads") is not None and d.get("attention_type", "mla") == "mla":
            d.pop("num_key_value_heads")  # MLA checkpoints copy the head count here; unused
        unknown = sorted(k for k in d if k not in known and k not in IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; "
                              "expected DeepseekV2/V3 field names")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @property
    def architecture(self) -> tuple[str, str]:
        """(architectures[0], model_type) of the saved config.json: what transformers, vLLM
        and SGLang pick the model class by. V2's softmax routing (greedy or group-limited) has
        no DeepseekV3 form, whose router is sigmoid noaux_tc only, so it is saved as V2."""
        if self.attention_type != "mla":  # baselines are nanoseek-only: no MHA-DeepSeek exists
            return "NanoseekForCausalLM", "nanoseek"
        if self.topk_method == "noaux_tc":
            return "DeepseekV3ForCausalLM", "deepseek_v3"
        return "DeepseekV2ForCausalLM", "deepseek_v2"

    def to_dict(self) -> dict[str, Any]:
        """The HF DeepseekV3 (or, for V2 routing, DeepseekV2) layout plus nanoseek's training
        fields. The routing fields keep their names in both: transformers' DeepseekV2Config
        reads topk_method, n_group, topk_group, routed_scaling_factor and norm_topk_prob."""
        d = dataclasses.asdict(self)
        if self.attention_type == "mla":
            d.pop("num_key_value_heads")
            d["num_key_value_heads"] = self.num_attention_heads
        arch, model_type = self.architecture
        d.update(architectures=[arch], model_type=model_type, hidden_act="silu",
                 attention_bias=False, tie_word_embeddings=False, rope_interleave=True,
                 torch_dtype="float32")
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
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


def load_config(preset_name: str | None = None, config_path: str | None = None) -> ModelConfig:
    """The CLI's rule: exactly one of --preset or --config."""
    if (preset_name is None) == (config_path is None):
        raise ConfigError("give exactly one of --preset NAME or --config FILE")
    return preset(preset_name) if preset_name else ModelConfig.from_json(config_path)
