"""ModelConfig: one dataclass for DeepSeek-V2, V2-Lite, V3, V3.2, V4 and nanoseek's own models, and its checks.

`arch` picks the family: "v3" (V2 and V3: MLA + DeepSeekMoE), "v32" (V3 plus DeepSeek Sparse
Attention's lightning indexer in every MLA layer) or "v4" (hybrid sliding / compressed sparse /
heavily compressed shared-KV attention, manifold-constrained hyper-connections, hash-routed
and sqrtsoftplus MoE). Field names are the Hugging Face `DeepseekV3Config`, `DeepseekV32Config`
and `DeepseekV4Config` names, so the `config.json` of a
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
ARCHS = ("v3", "v32", "v4")
SCORING_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_LAYER_TYPES = (SLIDING, CSA, HCA)
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
INDEXER_MODES = ("sparse", "dense")
# V3 fields with no meaning in V4: (name, V3's default, the V4 value they take)
V4_NO_OPS = (("n_group", 8, 1), ("topk_group", 4, 1), ("first_k_dense_replace", 3, 0),
             ("topk_method", "noaux_tc", "noaux_tc"))
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# The rope_scaling keys nanoseek implements (transformers' YaRN keys, rope_theta aside: that
# one is moved to the top-level field on load). Any other key is refused, never dropped.
YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ModelConfig:
    arch: str = "v3"  # "v3" (V2/V3), "v32" (V3.2), "v4"
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
    # --- lightning indexer (V3.2 DSA; V4's CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_mode: str = "sparse"  # "dense": V3.2's dense warm-up (only the indexer learns)
    indexer_loss_coef: float = 1.0  # weight of the indexer's KL loss (nanoseek)
    # --- V4 attention: shared-KV MQA over a sliding window, plus compressed entries
    head_dim: int = 512  # the one KV head's size; RoPE on its last qk_rope_head_dim
    o_groups: int = 8  # grouped low-rank output projection: groups g ...
    o_lora_rank: int = 1024  # ... and each group's rank d_g
    sliding_window: int = 128
    layer_types: list[str] | None = None  # per layer: sliding / CSA / HCA (V4)
    compress_rate_csa: int = 4  # m
    compress_rate_hca: int = 128  # m'
    compress_rope_theta: float = 160000.0  # RoPE base of the compressed layers
    mtp_layer_type: str = SLIDING  # attention kind of V4's MTP block
    # --- V4 manifold-constrained hyper-connections
    hc_mult: int = 4  # n residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- V4 MoE
    mlp_layer_types: list[str] | None = None  # per layer: "hash_moe" / "moe" (V4)
    swiglu_limit: float = 0.0  # clamp of the experts' SwiGLU inputs (routed and shared); 0 = none

    def __post_init__(self) -> None:
        if self.n_shared_experts is None:  # transformers' configs take an int; 0 means none
            self.n_shared_experts = 0
        if self.arch == "v4":
            self._fill_v4_schedules()
        self.validate()

    def _fill_v4_schedules(self) -> None:
        """V4 routes top-k over all experts in every layer: the V3 fields for expert groups and
        leading dense layers take their no-op values (n_group 1, topk_group 1,
        first_k_dense_replace 0, noaux_tc). Default schedules (transformers'): attention 2 HCA
        then CSA/HCA interleaved; MoE 3 hash layers then learned ones. Lists are copied."""
        for name, v3_default, v4 in V4_NO_OPS:
            value = getattr(self, name)
            if value not in (v3_default, v4):
                raise ConfigError(f"config field '{name}': {value!r} has no meaning in DeepSeek-V4, "
                                  f"which routes over all experts in every layer (leave it out, or {v4!r})")
            setattr(self, name, v4)
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(n - 3, 0)
        self.layer_types, self.mlp_layer_types = list(self.layer_types), list(self.mlp_layer_types)

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v32(self) -> bool:
        return self.arch == "v32"

    @property
    def is_v4(self) -> bool:
        return self.arch == "v4"

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers below first_k_dense_replace are dense; MTP layers follow the same rule.
        Every V4 layer is MoE."""
        return self.is_moe and (self.is_v4 or layer_id >= self.first_k_dense_replace)

    def layer_type(self, layer_id: int) -> str:
        """V4: the attention kind of layer `layer_id` (an MTP block past the main layers
        takes mtp_layer_type)."""
        if layer_id >= self.num_hidden_layers:
            return self.mtp_layer_type
        return self.layer_types[layer_id]

    def compress_rate(self, layer_type: str) -> int:
        """Tokens folded into one compressed entry: m for CSA, m' for HCA, 0 for sliding."""
        return {CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}.get(layer_type, 0)

    def is_hash_layer(self, layer_id: int) -> bool:
        """V4: a hash-routed MoE layer (experts from a frozen token-id table). MTP blocks
        route with a learned gate."""
        return (self.is_v4 and layer_id < self.num_hidden_layers
                and self.mlp_layer_types[layer_id] == "hash_moe")

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
        need(self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
        self._refuse_other_archs_fields(need)
        if self.arch == "v4":
            need(self.scoring_func in ("sqrtsoftplus", "sigmoid"), "scoring_func",
                 f"V4 scores experts with sqrtsoftplus (or sigmoid), got {self.scoring_func!r}")
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
        need((self.topk_method == "noaux_tc") == (self.scoring_func in ("sigmoid", "sqrtsoftplus")),
             "topk_method",
             f"{self.topk_method!r} does not go with scoring_func={self.scoring_func!r} "
             "(noaux_tc is V3's sigmoid and V4's sqrtsoftplus routing; greedy/group_limited_greedy "
             "are V2's softmax)")
        need(0 <= self.first_k_dense_replace, "first_k_dense_replace", "must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.is_moe:
            self._validate_moe(need)
        if self.rope_scaling is not None:
            self._validate_rope_scaling(need)
        if self.arch in ("v32", "v4"):
            self._validate_indexer(need)
        if self.arch == "v4":
            self._validate_v4(need)
        else:
            need(self.layer_types is None and self.mlp_layer_types is None, "layer_types",
                 f"layer_types / mlp_layer_types are V4 schedules; arch is {self.arch!r}")

    def _refuse_other_archs_fields(self, need) -> None:
        """A V4 field (or an indexer field) set on a model of another arch would be dropped from
        its config.json, or change the model without being saved: refused, never ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        v4_fields = ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rate_csa",
                     "compress_rate_hca", "compress_rope_theta", "mtp_layer_type", "hc_mult",
                     "hc_sinkhorn_iters", "hc_eps", "swiglu_limit")
        indexer_fields = ("index_n_heads", "index_head_dim", "index_topk", "indexer_mode",
                          "indexer_loss_coef")
        own = {"v3": (), "v32": indexer_fields, "v4": v4_fields + indexer_fields}[self.arch]
        for name in v4_fields + indexer_fields:
            if name not in own:
                need(getattr(self, name) == defaults[name], name,
                     f"is a {'V4' if name in v4_fields else 'V3.2/V4 indexer'} field; arch "
                     f"{self.arch!r} has no use for it (got {getattr(self, name)!r})")

    def _validate_indexer(self, need) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                 f"must be a positive integer, got {v!r}")
        need(self.attention_type == "mla", "attention_type",
             f"arch {self.arch!r} has its own attention; attention_type must stay 'mla'")
        need(self.q_lora_rank is not None, "q_lora_rank",
             f"arch {self.arch!r}: the indexer's queries come from the q-LoRA latent, so q_lora_rank "
             "must be set")
        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
             f"must hold the rope part (qk_rope_head_dim={self.qk_rope_head_dim}), got {self.index_head_dim}")
        need(self.indexer_mode in INDEXER_MODES, "indexer_mode",
             f"must be one of {INDEXER_MODES}, got {self.indexer_mode!r}")
        need(_is_number(self.indexer_loss_coef) and self.indexer_loss_coef >= 0, "indexer_loss_coef",
             f"must be a number >= 0, got {self.indexer_loss_coef!r}")

    def _validate_v4(self, need) -> None:
        n = self.num_hidden_layers
        for name in ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rate_csa",
                     "compress_rate_hca", "hc_mult", "hc_sinkhorn_iters"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                 f"must be a positive integer, got {v!r}")
        need(self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim",
             f"the rope slice ({self.qk_rope_head_dim}) must fit in head_dim={self.head_dim}")
        need((self.num_attention_heads * self.head_dim) % self.o_groups == 0, "o_groups",
             f"num_attention_heads*head_dim={self.num_attention_heads * self.head_dim} is not "
             f"divisible by o_groups={self.o_groups}")
        for name in ("compress_rate_csa", "compress_rate_hca"):
            need(getattr(self, name) >= 2, name, f"a compression rate folds >= 2 tokens, got {getattr(self, name)}")
        for name, allowed in (("layer_types", V4_LAYER_TYPES), ("mlp_layer_types", V4_MLP_LAYER_TYPES)):
            types = getattr(self, name)
            need(isinstance(types, list) and len(types) == n, name,
                 f"needs one entry per layer ({n}), got {types!r}")
            bad = sorted({t for t in types if t not in allowed})
            need(not bad, name, f"entries must be in {allowed}, got {bad}")
        need(self.mtp_layer_type in V4_LAYER_TYPES, "mtp_layer_type",
             f"must be one of {V4_LAYER_TYPES}, got {self.mtp_layer_type!r}")
        need(self.is_moe, "n_routed_experts", "every V4 layer is MoE: n_routed_experts must be set")
        need(self.n_shared_experts == 1, "n_shared_experts",
             f"V4 has one shared expert (transformers' DeepseekV4 builds exactly one), got {self.n_shared_experts}")
        need(self.norm_topk_prob, "norm_topk_prob",
             "V4 normalises the chosen experts' weights (transformers' DeepseekV4 always does)")
        widest = max((self.compress_rate(t) for t in self.layer_types + [self.mtp_layer_type]), default=0)
        need(self.sliding_window >= widest - 1, "sliding_window",
             f"must reach back over a compressor's open window (>= {widest - 1} for rate {widest}): "
             f"otherwise tokens older than the window but not yet compressed are seen by no one")
        need(self.q_lora_rank is not None, "q_lora_rank", "V4's queries go through q-LoRA: must be set")
        need(_is_number(self.swiglu_limit) and self.swiglu_limit >= 0, "swiglu_limit",
             f"must be a number >= 0 (0 = no clamp), got {self.swiglu_limit!r}")
        need(_is_number(self.hc_eps) and self.hc_eps > 0, "hc_eps", f"must be > 0, got {self.hc_eps!r}")

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
        return hf_json.architecture(self.attention_type, self.topk_method, self.arch)

    def to_dict(self) -> dict[str, Any]:
        """The HF layout (hf_json.to_hf) plus nanoseek's training fields."""
        return hf_json.to_hf(dataclasses.asdict(self))

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
