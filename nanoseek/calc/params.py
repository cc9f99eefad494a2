"""Parameter counts from a config alone, total and activated, by component.

Counting from formulas (never by building the model: DeepSeek-V3 is 671B) lets the same
function answer for any preset or config.json; a test checks every formula against
`sum(p.numel())` of a real `CausalLM` built from the tiny preset.

Conventions (the DeepSeek papers'):
  * total = every parameter of the main model, the embedding table included;
  * activated = the parameters a token computes with: attention, norms, router, shared
    experts, `num_experts_per_tok` routed experts per MoE layer and the output head, but
    NOT the embedding table (a token reads one row of it; no matmul). This is the
    convention that reproduces the published figures: V3 36.6B ("37B"; 37.6B with the
    embedding), V2 20.9B ("21B"), V2-Lite 2.45B ("2.4B"; 2.66B with the embedding);
  * the MTP modules are reported apart from the main model, as DeepSeek-V3 reports
    "671B + 14B": `mtp` counts the module's own weights, `mtp_with_copies` adds the copies
    of the embedding and output head that DeepSeek's checkpoint stores beside it;
  * `e_score_correction_bias` is a buffer (moved by the balancing rule, not trained by
    gradients) and is not counted; it is `n_routed_experts` numbers per MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.config import ModelConfig

COMPONENTS = ("embeddings", "attention", "norms", "dense_ffn", "router", "shared_experts",
              "routed_experts", "head")


@dataclass
class ParamCount:
    """Per-component totals of the main model, and of the MTP modules apart."""
    total: dict[str, int] = field(default_factory=dict)
    activated: dict[str, int] = field(default_factory=dict)
    mtp: int = 0  # the MTP modules' own weights (all of them, every module)
    mtp_activated: int = 0
    mtp_with_copies: int = 0  # + the embedding and head copies stored in DeepSeek's checkpoint

    @property
    def main_total(self) -> int:
        return sum(self.total.values())

    @property
    def main_activated(self) -> int:
        return sum(self.activated.values())

    def summary(self) -> dict:
        """The headline figures, flat (a training run's run.json "params", its log line)."""
        return {"total": self.main_total, "activated": self.main_activated, "mtp": self.mtp,
                "mtp_activated": self.mtp_activated, "total_with_mtp": self.main_total + self.mtp,
                "embedding": self.total["embeddings"], "lm_head": self.total["head"]}

    def to_dict(self) -> dict:
        return {"total": self.main_total, "activated": self.main_activated,
                "by_component": {c: {"total": self.total[c], "activated": self.activated[c]}
                                 for c in COMPONENTS},
                "mtp": {"total": self.mtp, "activated": self.mtp_activated,
                        "total_with_embedding_and_head_copies": self.mtp_with_copies},
                "total_with_mtp": self.main_total + self.mtp}


# --------------------------------------------------------------- one layer's parts
def attention_params(cfg: ModelConfig) -> int:
    """Projection weights of one attention layer (its q/kv norms are in `norms`)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    o_proj = H * cfg.v_head_dim * D
    if cfg.attention_type != "mla":  # MHA/GQA/MQA baseline with MLA's head sizes
        kvh = cfg.kv_heads
        return D * H * cfg.qk_head_dim + D * kvh * (cfg.qk_head_dim + cfg.v_head_dim) + o_proj
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim  # W_DQ, W_UQ
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # W_DKV and the shared rope key
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # W_UK, W_UV
    return q + kv_a + kv_b + o_proj


def attention_norm_params(cfg: ModelConfig) -> int:
    """The RMSNorms inside MLA (on c_Q and c_KV)."""
    if cfg.attention_type != "mla":
        return 0
    return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank


def ffn_params(dim: int, inter: int) -> int:
    """SwiGLU: gate, up and down projections."""
    return 3 * dim * inter


def block_params(cfg: ModelConfig, layer_id: int) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) by component for transformer block `layer_id`."""
    D = cfg.hidden_size
    total = dict.fromkeys(COMPONENTS, 0)
    total["attention"] = attention_params(cfg)
    total["norms"] = 2 * D + attention_norm_params(cfg)  # input/post-attention + MLA's
    if cfg.is_moe_layer(layer_id):
        expert = ffn_params(D, cfg.moe_intermediate_size)
        total["router"] = cfg.n_routed_experts * D
        total["shared_experts"] = (cfg.n_shared_experts or 0) * expert
        total["routed_experts"] = cfg.n_routed_experts * expert
        activated = dict(total, routed_experts=cfg.num_experts_per_tok * expert)
    else:
        total["dense_ffn"] = ffn_params(D, cfg.intermediate_size)
        activated = dict(total)
    return total, activated


def mtp_extra_params(cfg: ModelConfig) -> int:
    """What an MTP module adds to its block: enorm, hnorm, eh_proj [D, 2D], shared_head.norm."""
    D = cfg.hidden_size
    return 3 * D + 2 * D * D


# --------------------------------------------------------------------- the model
def count_params(cfg: ModelConfig) -> ParamCount:
    D, V = cfg.hidden_size, cfg.vocab_size
    out = ParamCount(total=dict.fromkeys(COMPONENTS, 0), activated=dict.fromkeys(COMPONENTS, 0))
    for i in range(cfg.num_hidden_layers):
        total, activated = block_params(cfg, i)
        for c in COMPONENTS:
            out.total[c] += total[c]
            out.activated[c] += activated[c]
    out.total["embeddings"] = V * D  # activated: 0, a lookup (see the module docstring)
    for d in (out.total, out.activated):
        d["head"] = V * D
        d["norms"] += D  # the final norm
    for k in range(cfg.num_nextn_predict_layers):
        total, activated = block_params(cfg, cfg.num_hidden_layers + k)
        out.mtp += sum(total.values()) + mtp_extra_params(cfg)
        out.mtp_activated += sum(activated.values()) + mtp_extra_params(cfg)
    out.mtp_with_copies = out.mtp + cfg.num_nextn_predict_layers * 2 * V * D
    return out


def matmul_params(cfg: ModelConfig, activated: bool = True, include_mtp: bool = False) -> int:
    """Parameters used as matmul weights per token: what FLOPs are counted from.
    Excludes the embedding (a lookup, not a matmul) and the norms (elementwise)."""
    pc = count_params(cfg)
    parts = pc.activated if activated else pc.total
    n = sum(v for c, v in parts.items() if c not in ("embeddings", "norms"))
    if include_mtp and cfg.num_nextn_predict_layers:
        D = cfg.hidden_size
        mtp_norms = cfg.num_nextn_predict_layers * (2 * D + attention_norm_params(cfg) + 3 * D)
        # each MTP module also runs the shared output head
        n += ((pc.mtp_activated if activated else pc.mtp) - mtp_norms
              + cfg.num_nextn_predict_layers * cfg.vocab_size * D)
    return n
