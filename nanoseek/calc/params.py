"""Parameter counts from a config alone, total and activated, by component.

Counting from formulas (never by building the model: DeepSeek-V3 is 671B, V4-Pro 1.6T) lets
the same function answer for any preset or config.json; tests check every formula against
`sum(p.numel())` of a real `CausalLM` built from the tiny presets and of transformers'
DeepseekV3/V32/V4ForCausalLM built on the meta device.

Conventions (the DeepSeek papers'):
  * total = every parameter of the main model, the embedding table included;
  * activated = the parameters a token computes with: attention, norms, router, shared
    experts, `num_experts_per_tok` routed experts per MoE layer and the output head, but
    NOT the embedding table (a token reads one row of it; no matmul). This is the
    convention that reproduces the published figures: V3 36.6B ("37B"; 37.6B with the
    embedding), V2 20.9B ("21B"), V2-Lite 2.45B ("2.4B"; 2.66B with the embedding),
    V4-Flash 13.2B ("13B"), V4-Pro 49.0B ("49B");
  * the MTP modules are reported apart from the main model, as DeepSeek-V3 reports
    "671B + 14B": `mtp` counts the module's own weights, `mtp_with_copies` adds the copies
    of the embedding and output head that DeepSeek's V3/V3.2 checkpoints store beside it
    (V4's checkpoint stores none: its MTP block shares them);
  * buffers are not parameters: `e_score_correction_bias` (moved by the balancing rule,
    `n_routed_experts` numbers per learned-router layer) and V4's hash table `tid2eid`
    (`vocab_size x num_experts_per_tok` frozen expert ids per hash layer) are not counted,
    as transformers registers both as buffers.

Per layer, beside V3's MLA and DeepSeekMoE:
  * V3.2 (DSA, lightning indexer): W^IQ [n_I·c_I, d_c'] (`wq_b`), W^IK [c_I, d] (`wk`),
    a LayerNorm on the keys (weight and bias) and the head weights w^I [n_I, d];
  * V4 attention (shared-KV MQA, grouped output): W_DQ [d_c', d], W_UQ [n_h·c, d_c'],
    W_KV [c, d], W_O^a (o_groups blocks of [d_g, n_h·c/g]), W_O^b [d, g·d_g], a sink per head;
  * V4 compressor: CSA (overlapping windows, m) projects to two series, W^KV and W^Z
    [2c, d] with a positional bias B [m, 2c]; HCA (m') one series, [c, d] and [m', c];
    each normalises its entries (c). CSA's indexer runs its own compressor at c_I, plus
    W^IUQ [n_I·c_I, d_c'] on the query latent and w^I [n_I, d];
  * V4 mHC, before attention and before the MoE: W [(2+n)n, n·d], a bias (2+n)n and 3
    scales; the head's collapse: [n, n·d], n and 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.config import ModelConfig

COMPONENTS = ("embeddings", "attention", "indexer", "compressor", "hyper_connections", "norms",
              "dense_ffn", "router", "shared_experts", "routed_experts", "head")
V3_COMPONENTS = ("embeddings", "attention", "norms", "dense_ffn", "router", "shared_experts",
                 "routed_experts", "head")  # the rows a V2/V3 table shows


@dataclass
class ParamCount:
    """Per-component totals of the main model, and of the MTP modules apart."""
    total: dict[str, int] = field(default_factory=dict)
    activated: dict[str, int] = field(default_factory=dict)
    mtp: int = 0  # the MTP modules' own weights (all of them, every module)
    mtp_activated: int = 0
    mtp_with_copies: int = 0  # + the embedding and head copies stored in DeepSeek's checkpoint
    elementwise: int = 0  # main-model parameters outside `norms` that no matmul uses (sinks, biases)
    mtp_elementwise: int = 0  # the same in the MTP modules, norms included

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
    """Projection weights of one MLA (or baseline) attention layer (its q/kv norms are in `norms`)."""
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
    """The RMSNorms inside the attention: MLA's on c_Q and c_KV; V4's on c_Q and the KV head."""
    if cfg.is_v4:
        return cfg.q_lora_rank + cfg.head_dim
    if cfg.attention_type != "mla":
        return 0
    return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank


def v32_indexer_params(cfg: ModelConfig) -> int:
    """V3.2's lightning indexer: W^IQ on the query latent, W^IK, the key LayerNorm, w^I."""
    nI, cI, D = cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size
    return cfg.q_lora_rank * nI * cI + D * cI + 2 * cI + D * nI


def v4_attention_params(cfg: ModelConfig) -> int:
    """V4's projections: W_DQ, W_UQ, the one KV head, the grouped W_O^a and W_O^b."""
    D, H, c = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * c
    o = H * c * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * D  # g blocks of [d_g, H·c/g]
    return q + D * c + o


def compressor_params(cfg: ModelConfig, m: int, dim: int, overlap: bool) -> int:
    """One compressor over windows of m tokens into entries of `dim`: W^KV, W^Z, B, the norm.
    Overlapping windows (CSA) project two series, so everything but the norm doubles."""
    series = (2 if overlap else 1) * dim
    return 2 * cfg.hidden_size * series + m * series + dim


def v4_compression_params(cfg: ModelConfig, layer_type: str) -> tuple[int, int]:
    """(compressor, indexer) parameters of a V4 layer of this attention kind."""
    m = cfg.compress_rate(layer_type)
    if not m:
        return 0, 0
    if layer_type != "compressed_sparse_attention":
        return compressor_params(cfg, m, cfg.head_dim, overlap=False), 0
    nI, cI = cfg.index_n_heads, cfg.index_head_dim
    indexer = (compressor_params(cfg, m, cI, overlap=True) + cfg.q_lora_rank * nI * cI
               + cfg.hidden_size * nI)
    return compressor_params(cfg, m, cfg.head_dim, overlap=True), indexer


def hc_params(cfg: ModelConfig) -> int:
    """One mHC mapping: W [(2+n)n, n·d], its bias (2+n)n and 3 scales (pre, post, comb)."""
    n = cfg.hc_mult
    return (2 + n) * n * (n * cfg.hidden_size + 1) + 3


def hc_head_params(cfg: ModelConfig) -> int:
    """The final collapse of the n streams: [n, n·d], a bias n and one scale."""
    n = cfg.hc_mult
    return n * (n * cfg.hidden_size + 1) + 1


def ffn_params(dim: int, inter: int) -> int:
    """SwiGLU: gate, up and down projections."""
    return 3 * dim * inter


def elementwise_params(cfg: ModelConfig, layer_id: int) -> int:
    """Parameters of block `layer_id` outside `norms` that no matmul multiplies: V3.2's key
    LayerNorm; V4's sinks, compressor biases B and norms, and the mHC biases and scales."""
    if cfg.is_v32:
        return 2 * cfg.index_head_dim
    if not cfg.is_v4:
        return 0
    t = cfg.layer_type(layer_id)
    m, c, cI = cfg.compress_rate(t), cfg.head_dim, cfg.index_head_dim
    n = (2 + cfg.hc_mult) * cfg.hc_mult
    out = cfg.num_attention_heads + 2 * (n + 3)
    if t == "compressed_sparse_attention":
        out += m * 2 * c + c + m * 2 * cI + cI
    elif m:
        out += m * c + c
    return out


def attention_block_params(cfg: ModelConfig, layer_id: int) -> dict[str, int]:
    """The attention side of block `layer_id` by component, its norms with the block's two."""
    D = cfg.hidden_size
    out = dict.fromkeys(COMPONENTS, 0)
    out["norms"] = 2 * D + attention_norm_params(cfg)  # input/post-attention + the attention's
    if cfg.is_v4:
        out["attention"] = v4_attention_params(cfg) + cfg.num_attention_heads  # + the sinks
        out["compressor"], out["indexer"] = v4_compression_params(cfg, cfg.layer_type(layer_id))
        out["hyper_connections"] = 2 * hc_params(cfg)  # before attention, before the MoE
        return out
    out["attention"] = attention_params(cfg)
    if cfg.is_v32:
        out["indexer"] = v32_indexer_params(cfg)
    return out


def block_params(cfg: ModelConfig, layer_id: int) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) by component for transformer block `layer_id`."""
    D = cfg.hidden_size
    total = attention_block_params(cfg, layer_id)
    if cfg.is_moe_layer(layer_id):
        expert = ffn_params(D, cfg.moe_intermediate_size)
        total["router"] = cfg.n_routed_experts * D  # a hash layer keeps its gate for the weights
        total["shared_experts"] = (cfg.n_shared_experts or 0) * expert
        total["routed_experts"] = cfg.n_routed_experts * expert
        activated = dict(total, routed_experts=cfg.num_experts_per_tok * expert)
    else:
        total["dense_ffn"] = ffn_params(D, cfg.intermediate_size)
        activated = dict(total)
    return total, activated


def mtp_extra_params(cfg: ModelConfig) -> int:
    """What an MTP module adds to its block: enorm, hnorm, the final norm, eh_proj [D, 2D]
    (V4: e_proj and h_proj, [D, D] each) and, in V4, its own collapse of the streams."""
    D = cfg.hidden_size
    return 3 * D + 2 * D * D + (hc_head_params(cfg) if cfg.is_v4 else 0)


def _mtp_elementwise(cfg: ModelConfig, layer_id: int) -> int:
    """Non-matmul parameters of an MTP module: its block's norms and elementwise ones, its
    three norms and, in V4, its head collapse's bias and scale."""
    block, _ = block_params(cfg, layer_id)
    return (block["norms"] + elementwise_params(cfg, layer_id) + 3 * cfg.hidden_size
            + (cfg.hc_mult + 1 if cfg.is_v4 else 0))


# --------------------------------------------------------------------- the model
def count_params(cfg: ModelConfig) -> ParamCount:
    D, V = cfg.hidden_size, cfg.vocab_size
    out = ParamCount(total=dict.fromkeys(COMPONENTS, 0), activated=dict.fromkeys(COMPONENTS, 0))
    for i in range(cfg.num_hidden_layers):
        total, activated = block_params(cfg, i)
        for c in COMPONENTS:
            out.total[c] += total[c]
            out.activated[c] += activated[c]
        out.elementwise += elementwise_params(cfg, i)
    out.total["embeddings"] = V * D  # activated: 0, a lookup (see the module docstring)
    for d in (out.total, out.activated):
        d["head"] = V * D
        d["norms"] += D  # the final norm
        d["hyper_connections"] += hc_head_params(cfg) if cfg.is_v4 else 0
    out.elementwise += cfg.hc_mult + 1 if cfg.is_v4 else 0  # hc_head's bias and scale
    for k in range(cfg.num_nextn_predict_layers):
        layer_id = cfg.num_hidden_layers + k
        total, activated = block_params(cfg, layer_id)
        out.mtp += sum(total.values()) + mtp_extra_params(cfg)
        out.mtp_activated += sum(activated.values()) + mtp_extra_params(cfg)
        out.mtp_elementwise += _mtp_elementwise(cfg, layer_id)
    copies = 0 if cfg.is_v4 else cfg.num_nextn_predict_layers * 2 * V * D
    out.mtp_with_copies = out.mtp + copies
    return out


def matmul_params(cfg: ModelConfig, activated: bool = True, include_mtp: bool = False) -> int:
    """Parameters used as matmul weights per token: what FLOPs are counted from.
    Excludes the embedding (a lookup, not a matmul), the norms and the elementwise
    parameters (V4's sinks, compressor biases, mHC biases and scales)."""
    pc = count_params(cfg)
    parts = pc.activated if activated else pc.total
    n = sum(v for c, v in parts.items() if c not in ("embeddings", "norms")) - pc.elementwise
    if include_mtp and cfg.num_nextn_predict_layers:
        # each MTP module also runs the shared output head
        n += ((pc.mtp_activated if activated else pc.mtp) - pc.mtp_elementwise
              + cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size)
    return n
