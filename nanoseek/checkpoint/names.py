"""Tensor names on disk <-> nanoseek's state-dict names, per architecture.

nanoseek's names are transformers' in-memory names, with the routed experts one module per
expert (`mlp.experts.{e}.gate_proj.weight`) and MTP module k as `mtp.{k}.*`.

V3 and V3.2 (`DeepseekV3ForCausalLM`, `DeepseekV32ForCausalLM`): the disk names are those names
(V3.2's lightning indexer is `self_attn.indexer.{wq_b,wk,k_norm,weights_proj}` in DeepSeek's
V3.2-Exp release and in transformers alike); MTP module k is `model.layers.{L + k}`, with
copies of the shared embedding and head beside it, as in DeepSeek's release.

V4 (`DeepseekV4ForCausalLM`) is read in three spellings:
  - DeepSeek's release, the names of its inference/model.py: `embed.weight`, `head.weight`,
    `norm.weight`, `hc_head_{fn,base,scale}`, `layers.N.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,
    wo_a,wo_b,attn_sink}`, `.attn.compressor.{ape,wkv,wgate,norm}`, `.attn.indexer.{wq_b,
    weights_proj,compressor.*}`, `.{attn,ffn}_norm`, `.hc_{attn,ffn}_{fn,base,scale}`,
    `.ffn.gate.{weight,bias,tid2eid}`, `.ffn.{experts.E,shared_experts}.{w1,w2,w3}` (w1 gate,
    w3 up, w2 down) and the MTP block `mtp.K.*` (a Block plus e_proj, h_proj, enorm, hnorm,
    norm, hc_head_*);
  - what transformers' save_pretrained writes: the same under `model.` (`head.weight` bare),
    with the attention's KV norm as `attn.norm.weight` (its renaming table maps `.norm.` to
    `.kv_norm.` and back) and no MTP (it does not build one);
  - transformers' in-memory names, with the experts fused into `mlp.experts.gate_up_proj`
    [E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I].
nanoseek writes the second spelling, so transformers loads it, and MTP in DeepSeek's (which
transformers skips: `_keys_to_ignore_on_load_unexpected = mtp.*`). A tensor missing from a
checkpoint is named in the spelling that checkpoint uses (`spelling`, `to_disk(..., spelling)`).
"""

from __future__ import annotations

import re

import torch

from nanoseek.config import ModelConfig

MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # V3: copies of shared tensors
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_V4_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.*)$")
_V4_MTP = re.compile(r"^(?:model\.)?mtp\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(mlp\.experts\.\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DS_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_UNFUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
SPELLINGS = ("deepseek", "transformers", "memory")  # V4's: release, save_pretrained, in-memory
W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
W_INV = {v: k for k, v in W.items()}

# V4, inside a block: nanoseek (= transformers in memory) -> DeepSeek. Compressor and indexer
# follow transformers' nesting: the CSA indexer lives in the compressor, its scorer holds
# weights_proj.
_COMPRESSOR = {"position_bias": "ape", "kv_proj.weight": "wkv.weight",
               "gate_proj.weight": "wgate.weight", "kv_norm.weight": "norm.weight"}
V4_BLOCK = {
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    **{f"self_attn.compressor.{k}": f"attn.compressor.{v}" for k, v in _COMPRESSOR.items()},
    **{f"self_attn.compressor.indexer.{k}": f"attn.indexer.compressor.{v}" for k, v in _COMPRESSOR.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{hc}_hc.{p}": f"hc_{hc}_{p}" for hc in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    **{f"mlp.shared_experts.{p}.weight": f"ffn.shared_experts.{w}.weight" for p, w in W.items()},
}
# V4's MTP block: a Block plus these (its embedding and head are the main model's).
V4_MTP = {**V4_BLOCK, **{f"{m}.weight": f"{m}.weight" for m in ("e_proj", "h_proj", "enorm", "hnorm", "norm")},
          **{f"hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")}}
V4_TOP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
          "model.norm.weight": "norm.weight",
          **{f"model.hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")}}
# transformers' save_pretrained spelling where it differs from DeepSeek's
TRANSFORMERS_SAVED = {"attn.kv_norm.weight": "attn.norm.weight"}
_FROM_DS = {v: k for k, v in V4_MTP.items()} | {"attn.norm.weight": "self_attn.kv_norm.weight"}
_FROM_DS_TOP = {v: k for k, v in V4_TOP.items()}
# copies of the shared embedding/head some exports put beside DeepSeek's MTP block
_V4_MTP_SHARED = ("embed.weight", "emb.weight", "head.weight", "embed_tokens.weight", "shared_head.head.weight")


class UnknownTensor(ValueError):
    """A state-dict tensor the architecture's name table has no checkpoint name for."""


# ------------------------------------------------------------------ state dict -> disk
def to_disk(name: str, cfg: ModelConfig, spelling: str = "transformers") -> str:
    """State-dict name -> its checkpoint name (`<x>_scale_inv` follows its weight): the one
    nanoseek writes, or for V4 the one of another spelling (DeepSeek's release, transformers'
    in-memory fused experts), to name a tensor a checkpoint of that spelling lacks."""
    if name.endswith("_scale_inv"):
        return to_disk(name.removesuffix("_scale_inv"), cfg, spelling) + "_scale_inv"
    if not cfg.is_v4:
        m = _MTP.match(name)
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}" if m else name
    if spelling not in SPELLINGS:
        raise ValueError(f"spelling must be one of {SPELLINGS}, got {spelling!r}")
    if spelling == "deepseek" and not _MTP.match(name):
        return _to_deepseek(name)
    if spelling == "memory" and not _MTP.match(name):
        m = _UNFUSED.match(name)
        return name if m is None else f"{m[1]}.{'down_proj' if m[2] == 'down_proj' else 'gate_up_proj'}"
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name  # embed_tokens, norm, hc_head: transformers keeps its own names here
    if m := _LAYER.match(name):
        rel = _block_to_disk(m[2], V4_BLOCK, name)
        return f"model.layers.{m[1]}.{TRANSFORMERS_SAVED.get(rel, rel)}"
    if m := _MTP.match(name):
        return f"mtp.{m[1]}.{_block_to_disk(m[2], V4_MTP, name)}"
    raise UnknownTensor(f"no V4 checkpoint name for state-dict tensor {name!r}")


def _to_deepseek(name: str) -> str:
    """A main-model state-dict name in DeepSeek's release spelling (its inference/model.py)."""
    if name in V4_TOP:
        return V4_TOP[name]
    if m := _LAYER.match(name):
        return f"layers.{m[1]}.{_block_to_disk(m[2], V4_BLOCK, name)}"
    raise UnknownTensor(f"no V4 checkpoint name for state-dict tensor {name!r}")


def spelling(disk_names, cfg: ModelConfig) -> str:
    """Which V4 spelling a checkpoint's names are in, judged by its main model (MTP is always
    DeepSeek's): "deepseek" (bare `layers.N.`, `embed.weight`), "memory" (transformers'
    module names, `self_attn`/`mlp`, fused experts) or "transformers" (what its
    save_pretrained writes). V3 and V3.2 have one spelling: "transformers"."""
    if not cfg.is_v4:
        return "transformers"
    main = [n for n in disk_names if not _V4_MTP.match(n)]
    if any(n.startswith("layers.") or (n in _FROM_DS_TOP and n != "head.weight") for n in main):  # both: head
        return "deepseek"
    if any(".self_attn." in n or ".mlp." in n for n in main):
        return "memory"
    return "transformers"


def _block_to_disk(rel: str, table: dict[str, str], full: str) -> str:
    if rel in table:
        return table[rel]
    if m := _EXPERT.match(rel):
        return f"ffn.experts.{m[1].rsplit('.', 1)[1]}.{W[m[2]]}.weight"
    raise UnknownTensor(f"no V4 checkpoint name for state-dict tensor {full!r}")


# ------------------------------------------------------------------ disk -> state dict
def from_disk(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint name (any spelling above) -> state-dict name; None for a copy of a shared
    tensor; unknown names come back as they are (the loader reports them unexpected)."""
    if name.endswith("_scale_inv"):
        base = from_disk(name.removesuffix("_scale_inv"), cfg)
        return None if base is None else base + "_scale_inv"
    if not cfg.is_v4:
        m = _LAYER.match(name)
        if m and int(m[1]) >= cfg.num_hidden_layers:
            if m[2] in MTP_SHARED:
                return None
            return f"mtp.{int(m[1]) - cfg.num_hidden_layers}.{m[2]}"
        return name
    if name.removeprefix("model.") in _FROM_DS_TOP:  # DeepSeek's top-level names, bare or under model.
        return _FROM_DS_TOP[name.removeprefix("model.")]
    if name in ("embed_tokens.weight", "norm.weight") or name.startswith("hc_head."):
        return "model." + name
    if m := _V4_LAYER.match(name):
        return f"model.layers.{m[1]}.{_block_from_disk(m[2])}"
    if m := _V4_MTP.match(name):
        return None if m[2] in _V4_MTP_SHARED else f"mtp.{m[1]}.{_block_from_disk(m[2])}"
    return name


def _block_from_disk(rel: str) -> str:
    if rel in _FROM_DS:
        return _FROM_DS[rel]
    if m := _DS_EXPERT.match(rel):
        return f"mlp.experts.{m[1]}.{W_INV[m[2]]}.weight"
    return rel  # already nanoseek's (transformers' in-memory) spelling


def from_disk_tensors(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) pairs one checkpoint tensor stands for: transformers' fused
    expert tensors (V3.2, V4) split into one weight per expert, anything else renamed."""
    if cfg.arch != "v3" and (m := _FUSED.match(name)) and t.ndim == 3:
        if m[2] == "down_proj":
            return [(f"{m[1]}.{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
        gate, up = t.chunk(2, dim=1)  # Concatenate(dim=1) of w1 then w3 in transformers' table
        return [pair for e in range(t.shape[0]) for pair in
                ((f"{m[1]}.{e}.gate_proj.weight", gate[e]), (f"{m[1]}.{e}.up_proj.weight", up[e]))]
    key = from_disk(name, cfg)
    return [] if key is None else [(key, t)]


def is_mtp_name(name: str, cfg: ModelConfig) -> bool:
    """Whether a checkpoint tensor belongs to an MTP module."""
    if cfg.is_v4:
        return _V4_MTP.match(name) is not None
    m = _LAYER.match(name)
    return m is not None and int(m[1]) >= cfg.num_hidden_layers
