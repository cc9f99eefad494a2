"""The config.json dialects: reading DeepSeek-, transformers- and nanoseek-written files into
ModelConfig's fields, and writing the HF layout other tools pick the architecture from.

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
}
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


def architecture(attention_type: str, topk_method: str) -> tuple[str, str]:
    """(architectures[0], model_type) of the saved config.json: what transformers, vLLM
    and SGLang pick the model class by. V2's softmax routing (greedy or group-limited) has
    no DeepseekV3 form, whose router is sigmoid noaux_tc only, so it is saved as V2."""
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
    if d["attention_type"] == "mla":
        d.pop("num_key_value_heads")
        d["num_key_value_heads"] = d["num_attention_heads"]
    arch, model_type = architecture(d["attention_type"], d["topk_method"])
    d.update(architectures=[arch], model_type=model_type, hidden_act="silu",
             attention_bias=False, tie_word_embeddings=False, rope_interleave=True,
             torch_dtype="float32")
    return d
