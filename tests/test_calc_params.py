"""Parameter counts: the published totals, and the formulas against a real CausalLM."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanoseek.calc.params import COMPONENTS, count_params, matmul_params
from nanoseek.cli import app
from nanoseek.config import preset
from nanoseek.model import CausalLM


def near(x, published, tol):
    return abs(x - published) <= tol * published


@pytest.mark.parametrize("name, total, activated, tol_act", [
    ("deepseek-v3", 671e9, 37e9, 0.012),
    ("deepseek-v2", 236e9, 21e9, 0.01),
    # the V2 paper prints 2.4B; the count is 2.45B (2.66B if the embedding were included)
    ("deepseek-v2-lite", 15.7e9, 2.4e9, 0.025),
])
def test_published_totals(name, total, activated, tol_act):
    pc = count_params(preset(name))
    assert near(pc.main_total, total, 0.01), pc.main_total
    assert near(pc.main_activated, activated, tol_act), pc.main_activated


def test_v3_mtp_reported_apart():
    pc = count_params(preset("deepseek-v3"))
    # 11.6B of its own; ~13.5B with the embedding and head copies (the release's "14B");
    # main + MTP = the 685B of the published checkpoint
    assert 11.4e9 < pc.mtp < 11.8e9
    assert near(pc.mtp_with_copies, 13.5e9, 0.01)
    assert near(pc.main_total + pc.mtp_with_copies, 685e9, 0.01)
    assert pc.mtp_with_copies - pc.mtp == 2 * 129280 * 7168


def test_v3_components_by_hand():
    cfg = preset("deepseek-v3")
    pc = count_params(cfg)
    D, L = 7168, 61
    mla = D * 1536 + 1536 * 128 * 192 + D * 576 + 512 * 128 * 256 + 128 * 128 * D
    assert pc.total["attention"] == L * mla
    assert pc.total["dense_ffn"] == 3 * 3 * D * 18432
    assert pc.total["routed_experts"] == 58 * 256 * 3 * D * 2048
    assert pc.activated["routed_experts"] == 58 * 8 * 3 * D * 2048
    assert pc.total["embeddings"] == 129280 * D and pc.activated["embeddings"] == 0
    assert pc.main_total == sum(pc.total[c] for c in COMPONENTS)


@pytest.mark.parametrize("overrides", [
    {}, dict(attention_type="gqa", num_key_value_heads=2), dict(attention_type="mha"),
    dict(attention_type="mqa"), dict(q_lora_rank=None, n_shared_experts=None),
    dict(n_routed_experts=None, num_nextn_predict_layers=2),
])
def test_formulas_match_the_model(overrides):
    cfg = preset("tiny", **overrides)
    with torch.device("meta"):
        model = CausalLM(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    pc = count_params(cfg)
    assert pc.main_total == main
    assert pc.mtp == mtp


def test_activated_matches_the_model():
    """Activated = all parameters minus the experts a token skips, minus the embedding."""
    cfg = preset("tiny")
    model = CausalLM(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    expert = sum(p.numel() for p in model.model.layers[1].mlp.experts[0].parameters())
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert moe_layers == 3
    skipped = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    assert count_params(cfg).main_activated == main - skipped - model.model.embed_tokens.weight.numel()


def test_matmul_params_exclude_lookups_and_norms():
    cfg = preset("tiny")
    model = CausalLM(cfg)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.startswith("mtp."))
    gate = sum(layer.mlp.gate.weight.numel() for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    skipped = 3 * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    assert matmul_params(cfg) == linear + gate - skipped
    assert matmul_params(cfg, activated=False) == linear + gate


def test_cli_json_and_table(tmp_path):
    r = CliRunner().invoke(app, ["calc", "params", "--preset", "deepseek-v3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["total"] == count_params(preset("deepseek-v3")).main_total
    assert d["by_component"]["routed_experts"]["activated"] == 58 * 8 * 3 * 7168 * 2048
    preset("deepseek-v2-lite").to_json(tmp_path / "config.json")
    r = CliRunner().invoke(app, ["calc", "params", "--config", str(tmp_path / "config.json")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "15.71B" in r.stdout and "main model" in r.stdout


def test_cli_bad_input():
    r = CliRunner().invoke(app, ["calc", "params", "--preset", "nope"])
    assert r.exit_code != 0 and "unknown preset" in r.output
    r = CliRunner().invoke(app, ["calc", "params"])
    assert r.exit_code != 0 and "exactly one" in r.output


@pytest.mark.parametrize("name, cls", [("deepseek-v3", "DeepseekV3"), ("deepseek-v2", "DeepseekV2"),
                                       ("deepseek-v2-lite", "DeepseekV2")])
def test_totals_match_transformers(name, cls):
    """The full-size models built by transformers on the meta device (no memory) have exactly
    the counted parameters (transformers builds no MTP module)."""
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in preset(name).to_dict().items() if k not in ("architectures", "model_type")}
    conf = getattr(transformers, cls + "Config")(**d)
    with torch.device("meta"):
        hf = getattr(transformers, cls + "ForCausalLM")(conf)
    assert sum(p.numel() for p in hf.parameters()) == count_params(preset(name)).main_total
