"""ModelConfig: one dataclass for DeepSeek-V2, V2-Lite, V3 and nanoseek's own models, and its checks.

Field names are the Hugging Face `DeepseekV3Config` names, so the `config.json` of a
published DeepSeek checkpoint, one written by transformers 5 (`rope_parameters`) and one
written by nanoseek all read the same way (hf_json.py translates). Fields that only nanoseek
uses (training weights, the attention baseline) are written beside them; transformers
ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.config import hf_json
from nanoseek.config.errors import ConfigError

ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# The rope_scaling keys nanoseek implements (transformers' YaRN keys, rope_theta aside: that
# one is moved to the top-level field on load). Any other key is refused, never dropped.
YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        """A config.json dict in any of the dialects hf_json reads."""
        kwargs = hf_json.from_hf(d, {f.name for f in dataclasses.fields(cls)}, source)
        try:
            return cls(**kwargs)
        except (ConfigError, TypeError) as e:
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
        """(architectures[0], model_type) this config is saved under (see hf_json)."""
        return hf_json.architecture(self.attention_type, self.topk_method)

    def to_dict(self) -> dict[str, Any]:
        """The HF layout (hf_json.to_hf) plus nanoseek's training fields."""
        return hf_json.to_hf(dataclasses.asdict(self))

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
