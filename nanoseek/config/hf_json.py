"""The config.json dialects: reading DeepSeek-, transformers- and nanoseek-written files into
ModelConfig's fields, and writing the HF layout other tools pick the architecture from.

V3.2 (`deepseek_v32`) is V3's file plus the indexer's three fields. V4 (`deepseek_v4`) comes in
two spellings: DeepSeek's release (`compress_ratios` per layer, MTP block included;
`num_hash_layers`; a top-level YaRN `rope_scaling` that applies to the compressed layers) and
transformers' (`layer_types`, `compress_rates` {type: rate}, `mlp_layer_types`,
`rope_parameters` {"main", "compress"}). Both read to the same fields; nanoseek writes
transformers' spelling.

Plain dict -> dict functions: ModelConfig (model_config.py) calls them, they know nothing of it.
"""

from __future__ import annotations

from typing import Any

from nanoseek.config.errors import ConfigError

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
    "router_jitter_noise", "partial_rotary_factor", "expert_dtype", "scale_fmt", "scale_dtype",
}
V4_FIELDS = ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "layer_types",
             "compress_rate_csa", "compress_rate_hca", "compress_rope_theta", "mtp_layer_type",
             "hc_mult", "hc_sinkhorn_iters", "hc_eps", "mlp_layer_types", "swiglu_limit")
INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk", "indexer_mode", "indexer_loss_coef")
# V3 fields a V4 model does not have (ModelConfig gives them their no-op values)
V3_ONLY_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "intermediate_size",
                  "first_k_dense_replace", "n_group", "topk_group", "topk_method",
                  "attention_type", "num_key_value_heads")
MODEL_TYPE_ARCH = {"deepseek_v32": "v32", "deepseek_v4": "v4"}
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# Ignored keys whose value must be this one for the architecture to be what nanoseek builds.
REQUIRED_VALUES = {
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "moe_layer_freq": 1, "rope_interleave": True,
}


def from_hf(d: dict[str, Any], known: set[str], source: str = "config") -> dict[str, Any]:
    """A config.json dict (DeepSeek-, transformers- or nanoseek-written) -> the dataclass's
    keyword arguments: V2 defaults filled in, transformers 5's `rope_parameters` folded into
    `rope_scaling`, ignorable keys dropped, unknown or contradictory ones refused."""
    d = dict(d)
    arch = d.setdefault("arch", MODEL_TYPE_ARCH.get(d.get("model_type"), "v3"))
    if arch == "v32":
        _fold_v32(d, source)
    elif arch == "v4":
        _fold_v4(d, source)
    else:
        d.pop("head_dim", None)  # transformers' DeepseekV3Config: qk_rope_head_dim again
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
    return {k: v for k, v in d.items() if k in known}


def _fold_v32(d: dict[str, Any], source: str) -> None:
    """transformers' DeepseekV32Config spells the dense/MoE split and the (uniform) attention
    twice: `mlp_layer_types` must agree with first_k_dense_replace, `layer_types` be all DSA."""
    n, k = d.get("num_hidden_layers", 61), d.get("first_k_dense_replace", 3)
    mlp = d.pop("mlp_layer_types", None)
    if mlp is not None and list(mlp) != ["dense"] * min(k, n) + ["sparse"] * max(n - k, 0):
        raise ConfigError(f"{source}: mlp_layer_types {mlp} is not first_k_dense_replace={k} dense "
                          "layers then MoE layers, the only V3.2 schedule nanoseek builds")
    lt = d.pop("layer_types", None)
    if lt is not None and set(lt) - {"indexed_attention"}:
        raise ConfigError(f"{source}: V3.2 layer_types must all be 'indexed_attention', got {sorted(set(lt))}")
    d.pop("head_dim", None)  # transformers sets it to qk_rope_head_dim


def _fold_v4(d: dict[str, Any], source: str) -> None:
    """DeepSeek's and transformers' V4 spellings -> ModelConfig's fields (in place)."""
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    rates = d.pop("compress_rates", None) or {}
    d.setdefault("compress_rate_csa", rates.get(CSA, 4))
    d.setdefault("compress_rate_hca", rates.get(HCA, 128))
    ratios = d.pop("compress_ratios", None)
    n = d.get("num_hidden_layers", 43)
    if ratios is not None and d.get("layer_types") is None:
        d["layer_types"], mtp = _layer_types_from_ratios(list(ratios), n, d, bad)
        if mtp is not None:
            d.setdefault("mtp_layer_type", mtp)
    n_hash = d.pop("num_hash_layers", None)
    if n_hash is not None and d.get("mlp_layer_types") is None:
        d["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(n - n_hash, 0)
    if "qk_rope_head_dim" not in d and "partial_rotary_factor" in d and "head_dim" in d:
        d["qk_rope_head_dim"] = int(d["head_dim"] * d["partial_rotary_factor"])
    d.setdefault("qk_rope_head_dim", 64)
    kvh = d.pop("num_key_value_heads", None)
    if kvh not in (None, 1):
        raise bad(f"num_key_value_heads is {kvh}; V4's attention has one shared KV head")
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict):
        d.setdefault("rope_theta", rp["main"].get("rope_theta", 10000.0))
        comp = dict(rp.get("compress") or {})
        d.setdefault("compress_rope_theta", comp.pop("rope_theta", 160000.0))
        comp.pop("partial_rotary_factor", None)
        if comp.get("rope_type", comp.get("type")) == "yarn":
            if comp.pop("attention_factor", 1.0) != 1.0:
                raise bad("V4's compressed-layer YaRN keeps attention_factor 1.0 (DeepSeek's reference "
                          "does not rescale cos/sin); another value is not implemented")
            d["rope_scaling"] = comp
    elif rp is not None:  # a flat dict: the YaRN of the compressed layers
        d["rope_parameters"] = rp
    d.setdefault("intermediate_size", d.get("moe_intermediate_size", 2048))  # unused by V4
    d.setdefault("scoring_func", "sqrtsoftplus")
    d.setdefault("topk_method", "noaux_tc")
    d.setdefault("first_k_dense_replace", 0)
    d.setdefault("n_group", 1)
    d.setdefault("topk_group", 1)
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        d.pop(key, None)


def _layer_types_from_ratios(ratios: list, n: int, d: dict, bad) -> tuple[list[str], str | None]:
    """DeepSeek's `compress_ratios` (0 or 1: sliding window only; m: CSA, which in DeepSeek's
    reference is the ratio that gets an indexer, 4; any other: HCA) -> layer_types, and the
    MTP block's kind when the list has one more entry per MTP layer."""
    n_mtp = d.get("num_nextn_predict_layers", 0)
    if len(ratios) not in (n, n + n_mtp):
        raise bad(f"compress_ratios has {len(ratios)} entries; expected num_hidden_layers={n} "
                  f"(or {n + n_mtp} with the MTP layers)")
    csa = d["compress_rate_csa"]
    hca = sorted({r for r in ratios if r not in (0, 1, csa)})
    if len(hca) > 1:
        raise bad(f"compress_ratios {sorted(set(ratios))} hold {len(hca)} heavy compression rates "
                  f"{hca}; V4 has one (compress_rate_hca)")
    if hca:
        d["compress_rate_hca"] = hca[0]
    kinds = [SLIDING if r in (0, 1) else CSA if r == csa else HCA for r in ratios]
    return kinds[:n], (kinds[n] if len(kinds) > n else None)


def architecture(attention_type: str, topk_method: str, arch: str = "v3") -> tuple[str, str]:
    """(architectures[0], model_type) of the saved config.json: what transformers, vLLM
    and SGLang pick the model class by. V2's softmax routing (greedy or group-limited) has
    no DeepseekV3 form, whose router is sigmoid noaux_tc only, so it is saved as V2."""
    if arch == "v32":
        return "DeepseekV32ForCausalLM", "deepseek_v32"
    if arch == "v4":
        return "DeepseekV4ForCausalLM", "deepseek_v4"
    if attention_type != "mla":  # baselines are nanoseek-only: no MHA-DeepSeek exists
        return "NanoseekForCausalLM", "nanoseek"
    if topk_method == "noaux_tc":
        return "DeepseekV3ForCausalLM", "deepseek_v3"
    return "DeepseekV2ForCausalLM", "deepseek_v2"


def to_hf(fields: dict[str, Any]) -> dict[str, Any]:
    """The dataclass's fields -> the HF DeepseekV3 (or, for V2 routing, DeepseekV2) layout
    plus nanoseek's training fields. The routing fields keep their names in both:
    transformers' DeepseekV2Config reads topk_method, n_group, topk_group,
    routed_scaling_factor and norm_topk_prob."""
    d = dict(fields)
    version = d.pop("arch")
    if version != "v4":
        for key in V4_FIELDS:
            d.pop(key)
    if version == "v3":
        for key in INDEXER_FIELDS:
            d.pop(key)
    if d["attention_type"] == "mla":
        d.pop("num_key_value_heads")
        d["num_key_value_heads"] = d["num_attention_heads"]
    arch, model_type = architecture(d["attention_type"], d["topk_method"], version)
    d.update(architectures=[arch], model_type=model_type, hidden_act="silu",
             attention_bias=False, tie_word_embeddings=False, rope_interleave=True,
             torch_dtype="float32")
    if version == "v4":
        _to_v4(d)
    return d


def _to_v4(d: dict[str, Any]) -> None:
    """ModelConfig's V4 fields -> transformers' DeepseekV4Config spelling (in place); the MTP
    block's attention kind stays as nanoseek's `mtp_layer_type` (transformers does not build
    the MTP block)."""
    for key in V3_ONLY_FIELDS:
        d.pop(key, None)
    d.pop("rope_interleave")
    d["num_key_value_heads"] = 1
    d["compress_rates"] = {CSA: d.pop("compress_rate_csa"), HCA: d.pop("compress_rate_hca")}
    factor = d["qk_rope_head_dim"] / d["head_dim"]
    main = {"rope_type": "default", "rope_theta": d["rope_theta"], "partial_rotary_factor": factor}
    compress = {"rope_type": "default", **(d.pop("rope_scaling") or {})}
    compress["rope_type"] = compress.pop("type", None) or compress["rope_type"]
    compress.update(rope_theta=d["compress_rope_theta"], partial_rotary_factor=factor)
    if compress["rope_type"] == "yarn":
        compress["attention_factor"] = 1.0
    d["rope_parameters"] = {"main": main, "compress": compress}
    d["partial_rotary_factor"] = factor
