"""ModelConfig for DeepSeek-V3.2 and V4: presets, both config.json spellings, clear refusals."""

import json

import pytest
import transformers

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.config.presets import PRESETS, preset

NEW = ["deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro", "tiny-v32", "tiny-v4"]


@pytest.mark.parametrize("name", NEW)
def test_preset_round_trips_through_config_json(name):
    cfg = preset(name)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


@pytest.mark.parametrize("name", ["tiny-v4", "deepseek-v4-flash", "tiny-v32", "deepseek-v3.2"])
def test_transformers_reads_what_nanoseek_writes(name):
    cfg = preset(name)
    d = cfg.to_dict()
    cls = transformers.DeepseekV4Config if cfg.is_v4 else transformers.DeepseekV32Config
    hf = cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.num_hidden_layers == cfg.num_hidden_layers
    if cfg.is_v4:
        assert hf.layer_types == cfg.layer_types and hf.mlp_layer_types == cfg.mlp_layer_types
        assert hf.compress_rates == {"compressed_sparse_attention": cfg.compress_rate_csa,
                                     "heavily_compressed_attention": cfg.compress_rate_hca}
        assert hf.qk_rope_head_dim == cfg.qk_rope_head_dim
        comp = hf.rope_parameters["compress"]
        assert comp["rope_theta"] == cfg.compress_rope_theta
        if cfg.rope_scaling:
            assert comp["rope_type"] == "yarn" and comp["factor"] == cfg.rope_scaling["factor"]
            assert comp["attention_factor"] == 1.0
    else:
        assert (hf.index_topk, hf.index_head_dim, hf.index_n_heads) == (
            cfg.index_topk, cfg.index_head_dim, cfg.index_n_heads)
    back = ModelConfig.from_dict(hf.to_dict())
    assert back == cfg


def test_deepseek_release_spelling_reads_like_transformers():
    """DeepSeek's config.json: compress_ratios with the MTP entry, num_hash_layers, a top-level
    YaRN rope_scaling, qk_rope_head_dim."""
    flash = preset("deepseek-v4-flash")
    ratios = [0 if t == "sliding_attention" else 4 if t.startswith("compressed") else 128
              for t in flash.layer_types] + [0]
    d = {k: v for k, v in flash.to_dict().items()
         if k not in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
                      "mtp_layer_type", "partial_rotary_factor")}
    d.update(compress_ratios=ratios, num_hash_layers=3, rope_scaling=dict(flash.rope_scaling),
             quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128]}, expert_dtype="fp4")
    assert ModelConfig.from_dict(d) == flash


def test_tiny_presets_hold_every_layer_kind():
    v4 = preset("tiny-v4")
    assert set(v4.layer_types) == {"sliding_attention", "compressed_sparse_attention",
                                   "heavily_compressed_attention"}
    assert set(v4.mlp_layer_types) == {"hash_moe", "moe"} and v4.num_nextn_predict_layers >= 1
    assert 200 // v4.compress_rate_hca >= 10 and 200 // v4.sliding_window >= 10
    assert v4.is_hash_layer(0) and not v4.is_hash_layer(v4.num_hidden_layers)
    assert v4.layer_type(v4.num_hidden_layers) == v4.mtp_layer_type
    assert [v4.compress_rate(t) for t in v4.layer_types] == [0, 4, 16, 4]
    v32 = preset("tiny-v32")
    assert v32.index_topk < 200 and v32.is_v32


@pytest.mark.parametrize("change,field", [
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(mlp_layer_types=["hash_moe", "moe", "learned", "moe"]), "mlp_layer_types"),
    (dict(o_groups=3), "o_groups"),
    (dict(qk_rope_head_dim=128), "qk_rope_head_dim"),
    (dict(compress_rate_hca=1), "compress_rate_hca"),
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(mtp_layer_type="full"), "mtp_layer_type"),
])
def test_bad_v4_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny-v4", **change)


def test_bad_v32_and_v3_fields_are_named():
    with pytest.raises(ConfigError, match="index_topk"):
        preset("tiny-v32", index_topk=0)
    with pytest.raises(ConfigError, match="q_lora_rank"):
        preset("tiny-v32", q_lora_rank=None)
    with pytest.raises(ConfigError, match="indexer_mode"):
        preset("tiny-v32", indexer_mode="warm")
    with pytest.raises(ConfigError, match="layer_types"):
        preset("tiny", layer_types=["sliding_attention"] * 4)
    with pytest.raises(ConfigError, match="arch"):
        preset("tiny", arch="v5")
    d = preset("tiny-v4").to_dict()
    d.pop("layer_types")
    d["compress_ratios"] = [0, 4, 16, 32]
    with pytest.raises(ConfigError, match="heavy compression rates"):
        ModelConfig.from_dict(d)
    d = preset("tiny-v32").to_dict()
    d["mlp_layer_types"] = ["sparse"] * d["num_hidden_layers"]
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelConfig.from_dict(d)


def test_v3_config_json_is_unchanged_by_the_new_fields():
    d = preset("deepseek-v3").to_dict()
    for key in ("arch", "head_dim", "layer_types", "index_topk", "hc_mult", "indexer_mode"):
        assert key not in d
    assert d["model_type"] == "deepseek_v3"


def test_v4_preset_list():
    assert {"deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro", "tiny-v32", "tiny-v4"} <= set(PRESETS)


@pytest.mark.parametrize("name,change,field", [
    ("tiny", dict(swiglu_limit=5.0), "swiglu_limit"),
    ("tiny", dict(hc_mult=2), "hc_mult"),
    ("tiny", dict(index_topk=8), "index_topk"),
    ("tiny-v32", dict(sliding_window=64), "sliding_window"),
    ("tiny-v4", dict(n_group=4), "n_group"),
    ("tiny-v4", dict(first_k_dense_replace=1), "first_k_dense_replace"),
    ("tiny-v4", dict(scoring_func="softmax", topk_method="greedy"), "topk_method|scoring_func"),
    ("tiny-v4", dict(n_shared_experts=0), "n_shared_experts"),
    ("tiny-v4", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("tiny-v4", dict(sliding_window=4), "sliding_window"),
])
def test_fields_another_arch_would_drop_or_ignore_are_refused(name, change, field):
    """Nothing set on a config is silently lost on save or overridden: a V4 field on a V3 model,
    a V3 routing field V4 has no use for, a V4 shape transformers cannot build, a window that
    leaves tokens no branch sees."""
    with pytest.raises(ConfigError, match=field):
        preset(name, **change)


def test_v3_defaults_of_v4_no_op_fields_are_accepted():
    cfg = preset("tiny-v4", n_group=8, topk_group=4, first_k_dense_replace=3)  # V3's defaults
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace) == (1, 1, 0)
    assert preset("tiny-v4", scoring_func="sigmoid").scoring_func == "sigmoid"
