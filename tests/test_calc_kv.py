"""KV-cache sizes: hand-computed values, and the real cache filled by the real model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanoseek.calc.kv import kv_bytes_per_token, kv_table, row_bytes, values_per_token_layer
from nanoseek.cli import app
from nanoseek.config import ConfigError, preset
from nanoseek.model import CausalLM
from nanoseek.model.cache import ContiguousCache


def test_v3_by_hand():
    cfg = preset("deepseek-v3")
    assert values_per_token_layer(cfg, "mla") == 512 + 64
    assert values_per_token_layer(cfg, "mha") == 128 * (192 + 128) == 40960
    assert values_per_token_layer(cfg, "gqa", 8) == 8 * 320
    assert values_per_token_layer(cfg, "mqa") == 320
    # 70,272 bytes: the "70 KB per token" of the DeepSeek-V3 ISCA'25 paper (BF16, 61 layers)
    assert kv_bytes_per_token(cfg, "mla", "bf16") == 576 * 2 * 61 == 70272
    assert kv_bytes_per_token(cfg, "mha", "fp32") == 40960 * 4 * 61
    # FP8: one byte per value + a 4-byte scale per 128 values (576 -> 5 scales)
    assert kv_bytes_per_token(cfg, "mla", "fp8") == (576 + 4 * 5) * 61
    assert row_bytes(256, "fp8") == 256 + 8 and row_bytes(257, "fp8") == 257 + 12


def test_table_ratios_and_totals():
    cfg = preset("deepseek-v3")
    rows = {(r.attention, r.dtype): r for r in kv_table(cfg, batch=4, seq_len=1000, gqa_groups=(8, 16))}
    assert rows[("mha", "bf16")].vs_mla == pytest.approx(40960 / 576)
    assert rows[("gqa-16", "bf16")].vs_mha == pytest.approx(16 / 128)
    assert rows[("mla", "fp32")].total_bytes == 576 * 4 * 61 * 4 * 1000
    assert rows[("mla", "fp8")].bytes_per_token < rows[("mla", "bf16")].bytes_per_token / 1.9


@pytest.mark.parametrize("overrides", [
    {}, dict(attention_type="mha"), dict(attention_type="gqa", num_key_value_heads=2),
    dict(attention_type="mqa"),
])
def test_matches_contiguous_cache(overrides):
    """Fill a ContiguousCache with the real tiny model: bytes per token must agree."""
    cfg = preset("tiny", **overrides)
    model = CausalLM(cfg).eval()
    B, S = 2, 7
    cache = ContiguousCache(B, 16)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, S)), cache=cache)
    assert cache.nbytes() == kv_bytes_per_token(cfg, dtype="fp32") * B * S
    kind = cfg.attention_type
    assert cache.nbytes() == row_bytes(values_per_token_layer(cfg, kind, cfg.kv_heads), "fp32") \
        * cfg.num_hidden_layers * B * S


def test_bad_input():
    cfg = preset("deepseek-v3")
    with pytest.raises(ConfigError, match="gqa"):
        values_per_token_layer(cfg, "gqa", 3)
    with pytest.raises(ConfigError, match="dtype"):
        row_bytes(10, "int3")
    r = CliRunner().invoke(app, ["calc", "kv", "--preset", "deepseek-v3", "--gqa", "5"])
    assert r.exit_code != 0 and "gqa" in r.output


def test_cli():
    r = CliRunner().invoke(app, ["calc", "kv", "--preset", "deepseek-v3", "--batch", "8",
                                 "--seq-len", "32768", "--dtype", "bf16", "--gqa", "8", "--gqa", "16", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    mla = next(x for x in d["rows"] if x["attention"] == "mla")
    assert mla["total_bytes"] == 70272 * 8 * 32768
    assert {x["attention"] for x in d["rows"]} == {"mha", "gqa-8", "gqa-16", "mqa", "mla"}
    r = CliRunner().invoke(app, ["calc", "kv", "--preset", "deepseek-v3"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "70.27 KB" in r.stdout


def test_v2_paper_elements():
    """DeepSeek-V2 Table 1: MLA caches (d_c + d_h^R) * l elements per token = (512 + 64) * 60."""
    cfg = preset("deepseek-v2")
    assert kv_bytes_per_token(cfg, "mla", "fp32") // 4 == (512 + 64) * 60


def test_default_gqa_groups():
    from nanoseek.calc.kv import default_gqa_groups
    assert default_gqa_groups(preset("deepseek-v3")) == (8,)
    assert default_gqa_groups(preset("tiny")) == (2,)  # 4 heads
    assert default_gqa_groups(preset("tiny", num_attention_heads=2)) == ()
    r = CliRunner().invoke(app, ["calc", "kv", "--preset", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    assert {x["attention"] for x in json.loads(r.stdout)["rows"]} == {"mha", "gqa-2", "mqa", "mla"}
