"""ModelConfig reads the published DeepSeek configs, writes transformers-readable JSON,
and rejects unknown or contradictory fields by name."""

from pathlib import Path

import pytest
import transformers

from nanoseek.cli.common import load_config
from nanoseek.config import PRESETS, ConfigError, ModelConfig, preset

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite"])
def test_published_configs_read_and_match_presets(name):
    cfg = ModelConfig.from_json(DATA / f"{name}.config.json")
    ref = preset(name)
    for field in ("hidden_size", "num_hidden_layers", "n_routed_experts", "q_lora_rank", "scoring_func",
                  "topk_method", "routed_scaling_factor", "rope_scaling", "norm_topk_prob",
                  "num_nextn_predict_layers", "n_group", "topk_group", "first_k_dense_replace"):
        assert getattr(cfg, field) == getattr(ref, field), field


def test_tiny_preset_switches_every_v3_feature_on():
    cfg = preset("tiny")
    assert cfg.q_lora_rank and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert cfg.n_shared_experts == 1 and cfg.first_k_dense_replace >= 1
    assert cfg.num_nextn_predict_layers == 1 and cfg.topk_method == "noaux_tc"
    import torch
    from nanoseek.model import CausalLM
    with torch.device("meta"):
        n = sum(p.numel() for p in CausalLM(cfg).parameters())
    assert 5e6 <= n <= 20e6


def test_round_trip_and_transformers_reads_our_json(tmp_path):
    cfg = preset("tiny")
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3" and hf.kv_lora_rank == cfg.kv_lora_rank
    assert hf.n_group == cfg.n_group and hf.num_nextn_predict_layers == 1


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite"])
def test_v2_presets_are_written_as_v2_and_read_back_by_transformers(tmp_path, name):
    cfg = preset(name)
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DeepseekV2Config" and hf.architectures == ["DeepseekV2ForCausalLM"]
    for field in ("topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                  "q_lora_rank", "n_shared_experts"):
        assert getattr(hf, field) == getattr(cfg, field), field


def test_null_shared_experts_means_none_and_is_written_as_0():
    """transformers' configs take only an int here (null fails its validation)."""
    cfg = preset("tiny", n_shared_experts=None)
    assert cfg.n_shared_experts == 0 and cfg.to_dict()["n_shared_experts"] == 0
    assert ModelConfig.from_dict({**preset("tiny").to_dict(), "n_shared_experts": None}) == cfg


def test_transformers5_rope_parameters_are_understood(tmp_path):
    hf = transformers.DeepseekV3Config(rope_scaling={"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 64},
                                       rope_theta=5000.0)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 4.0


def test_unknown_field_is_named(tmp_path):
    d = preset("tiny").to_dict()
    d["n_routed_expert"] = 8  # a typo
    with pytest.raises(ConfigError, match="n_routed_expert"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("changes,field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(scoring_func="softmax"), "topk_method"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(attention_type="gqa", num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_contradictory_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        preset("tiny", **changes)


def test_architecture_changing_values_are_rejected():
    d = preset("tiny").to_dict()
    d["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_dict(d)


def test_load_config_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load_config()
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("tiny-ish")
    assert set(PRESETS) >= {"tiny", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"}


def test_info_command_counts_what_the_model_builds():
    import torch
    from typer.testing import CliRunner

    from nanoseek.cli import app
    from nanoseek.model import CausalLM
    res = CliRunner().invoke(app, ["info", "--preset", "tiny"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    with torch.device("meta"):
        model = CausalLM(preset("tiny"))
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert f"{main:,}" in res.output and f"{mtp:,}" in res.output
    bad = CliRunner().invoke(app, ["info"])
    assert bad.exit_code != 0 and "--preset" in bad.output
