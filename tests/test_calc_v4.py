"""The calculators for DeepSeek-V3.2 and V4: parameter counts against transformers' models,
what each KV cache holds as the context grows, FLOPs by hand, and the V4 report's ratios."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanoseek.calc.capacity import Assumptions, plan_capacity, weight_bytes
from nanoseek.calc.compare import PUBLISHED, compare
from nanoseek.calc.flops import mean_seen, seen, token_flops, train_attention_flops_per_token
from nanoseek.calc.gpus import get_gpu
from nanoseek.calc.kv import (ROW_FORMATS, cache_terms, deepseek_dtypes, kv_bytes_per_token, kv_cache_bytes,
                              kv_read_bytes, uniform_dtypes)
from nanoseek.calc.params import count_params, matmul_params
from nanoseek.cli import app
from nanoseek.config import ConfigError, preset

pytestmark = pytest.mark.usefixtures("one_thread")
SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_MIXES = [
    {},  # tiny-v4: sliding, CSA, HCA, CSA; one hash layer
    dict(layer_types=[HCA, HCA, CSA, CSA], mlp_layer_types=["hash_moe"] * 4),
    dict(layer_types=[SW, SW, SW, HCA], mlp_layer_types=["moe"] * 4, hc_mult=2, num_experts_per_tok=3),
    dict(layer_types=[CSA, SW, CSA, SW], compress_rate_csa=8, num_nextn_predict_layers=0, o_groups=4),
]


def hf_model(cfg):
    """transformers' model of this config, on the meta device (no memory, any size)."""
    transformers = pytest.importorskip("transformers")
    cls = "DeepseekV4" if cfg.is_v4 else "DeepseekV32"
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        return getattr(transformers, cls + "ForCausalLM")(getattr(transformers, cls + "Config")(**d))


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name, overrides", [("tiny-v4", o) for o in V4_MIXES] + [
    ("tiny-v32", {}), ("tiny-v32", dict(index_n_heads=2, index_head_dim=16, first_k_dense_replace=2)),
    ("deepseek-v3.2", {}), ("deepseek-v4-flash", {}), ("deepseek-v4-pro", {})])
def test_counts_equal_transformers(name, overrides):
    """transformers builds no MTP block and holds tid2eid / e_score_correction_bias as
    buffers: its parameters are exactly the main model we count; its matmul weights are its
    tensors of two dimensions or more, but the embedding and the compressors' biases B."""
    cfg = preset(name, **overrides)
    model = hf_model(cfg)
    params = dict(model.named_parameters())
    pc = count_params(cfg)
    assert sum(p.numel() for p in params.values()) == pc.main_total
    matmul = sum(p.numel() for n, p in params.items()
                 if p.dim() >= 2 and "embed_tokens" not in n and "position_bias" not in n)
    assert matmul_params(cfg, activated=False) == matmul


@pytest.mark.parametrize("name, overrides", [("tiny-v4", {}), ("tiny-v32", {}),
                                            ("tiny-v4", dict(V4_MIXES[1], mtp_layer_type=CSA))])
def test_counts_equal_the_model(name, overrides):
    """nanoseek's own model, its MTP block (DeepSeek's: a full V4 block, e_proj, h_proj, three
    norms and its own head collapse) included."""
    from nanoseek.model import CausalLM
    cfg = preset(name, **overrides)
    with torch.device("meta"):
        model = CausalLM(cfg)
    pc = count_params(cfg)
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp.")) == pc.main_total
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.")) == pc.mtp


@pytest.mark.parametrize("name", ["tiny-v4", "tiny-v32"])
def test_matmuls_match_torch_flop_counter(name):
    """torch counts the matmuls of a real forward of S tokens (the experts on the tokens
    routed to them): S x 2 x activated matmul params; V4's grouped W_O^a runs as a batched
    matmul, so its share is among the bmm's."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseek.model import CausalLM
    cfg = preset(name)
    model = CausalLM(cfg).eval()
    S = 32
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randint(0, cfg.vocab_size, (1, S)))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    o_a = sum(p.numel() for n, p in model.named_parameters() if "o_a_proj" in n and not n.startswith("mtp."))
    assert counts["aten.mm"] + counts.get("aten.addmm", 0) + 2 * S * o_a == S * 2 * matmul_params(cfg)


def test_activated_by_hand():
    cfg = preset("tiny-v4")
    pc = count_params(cfg)
    expert = 3 * 256 * 128
    skipped = 4 * (16 - 2) * expert  # every V4 layer is MoE, hash layers too
    assert pc.main_total - pc.main_activated == skipped + 4096 * 256  # + the embedding lookup
    assert pc.mtp > 0 and pc.mtp_with_copies == pc.mtp  # V4's MTP shares embedding and head


def test_published_totals():
    """V4-Flash 284B / 13B and V4-Pro 1.6T / 49B at the published rounding (main model; the
    MTP block adds 6.6B and 25.8B); V3.2 "685B" on its model card = main + MTP + the MTP's
    embedding and head copies, as for V3."""
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        pc, pub = count_params(preset(name)), PUBLISHED[name]
        digits = 1e12 if pub["total"] >= 1e12 else 1e9
        assert round(pc.main_total / digits, 1 if digits == 1e12 else 0) == pub["total"] / digits
        assert round(pc.main_activated / 1e9) == pub["activated"] / 1e9
    pc = count_params(preset("deepseek-v3.2"))
    assert round((pc.main_total + pc.mtp_with_copies) / 1e9) == 685
    assert round(pc.main_activated / 1e9) == 37


# ------------------------------------------------------------------------------ KV cache
def test_row_formats():
    assert ROW_FORMATS["fp8-mla"].bytes(576, 64) == 512 + 4 * 4 + 64 * 2 == 656
    assert ROW_FORMATS["fp8"].bytes(128) == 132  # V3.2's indexer key
    assert ROW_FORMATS["fp8-v4"].bytes(512, 64) == 448 + 7 + 128
    assert ROW_FORMATS["fp4"].bytes(128) == 64 + 4
    assert ROW_FORMATS["bf16"].bytes(512, 64) == 1024


def test_v32_is_linear_in_the_length():
    cfg = preset("deepseek-v3.2")
    for L in (1, 1000, 1 << 20):
        assert kv_cache_bytes(cfg, L, uniform_dtypes("bf16")) == L * 61 * (576 + 128) * 2
        assert kv_cache_bytes(cfg, L, deepseek_dtypes(cfg)) == L * 61 * (656 + 132)
    assert kv_bytes_per_token(cfg, dtype="bf16") == 61 * (576 + 128) * 2
    assert kv_bytes_per_token(cfg, "mla", dtype="bf16", include_mtp=True) == 62 * (576 + 128) * 2


def test_v4_terms_grow_as_expected():
    cfg = preset("deepseek-v4-flash")  # 2 sliding, 21 CSA, 20 HCA; window 128, m 4, m' 128
    dt = uniform_dtypes("bf16")

    def terms(L):
        return {t.name.split(" (")[0]: t for t in cache_terms(cfg, L, dt)}
    small, big, bigger = terms(64), terms(8192), terms(16384)
    assert small["sliding window"].entries == 64 and big["sliding window"].entries == 128
    assert big["sliding window"].bytes == bigger["sliding window"].bytes == 43 * 128 * 1024  # saturated
    assert big["CSA compressed entries"].bytes == 21 * 8192 // 4 * 1024
    assert bigger["CSA compressed entries"].bytes == 2 * big["CSA compressed entries"].bytes
    assert big["CSA indexer keys"].bytes == 21 * 2048 * 128 * 2
    assert big["HCA compressed entries"].bytes == 20 * 64 * 1024 and small["HCA compressed entries"].entries == 0
    assert big["HCA compressor open window"].bytes == 20 * 2 * 128 * 512 * 4  # kv + score, FP32
    # per token it falls towards the compressed rate, unlike V3.2's
    per_token = [kv_cache_bytes(cfg, L, dt) / L for L in (1024, 1 << 15, 1 << 20)]
    assert per_token[0] > per_token[1] > per_token[2] > 21 * (1024 + 256) / 4
    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        kv_bytes_per_token(cfg)


def test_v4_compressed_rows_match_transformers_cache():
    """transformers' cache after a 70-token forward of tiny-v4 holds S // m compressed entries
    and indexer keys per CSA layer, S // m' per HCA layer; its window keeps sliding_window - 1
    past entries where DeepSeek's ring buffer keeps sliding_window (counted here)."""
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny-v4")
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**d)).eval()
    S = 70
    with torch.no_grad():
        cache = model(torch.randint(0, cfg.vocab_size, (1, S)), use_cache=True).past_key_values
    held = {}
    for layer, kind in zip(cache.layers, cfg.layer_types):
        for name, kv in getattr(layer, "compressed_kv", {}).items():
            held[(kind, name)] = held.get((kind, name), 0) + kv.shape[1] * kv.shape[2]
        assert layer.keys.shape[2] == min(S, cfg.sliding_window) - 1
    counted = {t.name.split(" (")[0]: t.layers * t.entries * t.values for t in cache_terms(cfg, S)}
    assert held[(CSA, "compressor")] == counted["CSA compressed entries"] == 2 * (S // 4) * 64
    assert held[(CSA, "indexer")] == counted["CSA indexer keys"] == 2 * (S // 4) * 32
    assert held[(HCA, "compressor")] == counted["HCA compressed entries"] == (S // 16) * 64


def test_decode_reads_only_what_is_selected():
    cfg = preset("deepseek-v3.2")
    dt = uniform_dtypes("bf16")
    L = 100_000
    assert kv_read_bytes(cfg, L, dt) == 61 * (2048 * 1152 + L * 256)
    assert kv_read_bytes(cfg, 1000, dt) == kv_cache_bytes(cfg, 1000, dt)  # under top-k: all of it
    v4 = preset("deepseek-v4-flash")
    read = kv_read_bytes(v4, L, dt)
    assert read == 43 * 128 * 1024 + 21 * (512 * 1024 + L // 4 * 256) + 20 * (L // 128) * 1024


# ---------------------------------------------------------------------------------- FLOPs
def test_mean_seen_is_the_mean():
    for S, m, cap in [(1, 1, None), (100, 4, None), (100, 4, 7), (37, 16, 1), (500, 1, 128), (9, 3, 0)]:
        assert mean_seen(S, m, cap) == pytest.approx(sum(seen(t, m, cap) for t in range(1, S + 1)) / S)


def test_v4_token_flops_by_hand():
    cfg = preset("tiny-v4", num_attention_heads=4, head_dim=64, sliding_window=16, compress_rate_csa=4,
                 compress_rate_hca=16, index_topk=16, index_n_heads=4, index_head_dim=32, hc_mult=4,
                 hidden_size=256, layer_types=[SW, CSA, HCA, CSA])
    ctx = 200
    csa = 4 * 4 * 64 * (16 + min(16, ctx // 4))
    hca = 4 * 4 * 64 * (16 + ctx // 16)
    sw = 4 * 4 * 64 * 16
    parts = token_flops(cfg, ctx)
    assert parts["attention"] == sw + 2 * csa + hca
    assert parts["indexer"] == 2 * 2 * 4 * (32 + 1) * (ctx // 4)
    assert parts["matmuls"] == 2 * matmul_params(cfg)
    n, d = 4, 256
    assert parts["hyper_connections"] == 4 * 2 * 2 * (2 * n + n * n) * d + 2 * n * d
    # training: the mean over the positions, not the count at the mean position
    assert train_attention_flops_per_token(cfg, 64) == pytest.approx(
        sum(token_flops(cfg, t)["attention"] + token_flops(cfg, t)["indexer"] for t in range(1, 65)) / 64)


def test_v32_token_flops_by_hand():
    fields = dict(num_attention_heads=4, kv_lora_rank=64, qk_rope_head_dim=16, index_topk=64, index_n_heads=4,
                  index_head_dim=32, num_hidden_layers=4)
    cfg = preset("tiny-v32", **fields)
    for ctx in (10, 1000):
        parts = token_flops(cfg, ctx)
        assert parts["attention"] == 4 * 2 * 4 * (2 * 64 + 16) * min(ctx, 64)
        assert parts["indexer"] == 4 * 2 * 4 * 33 * ctx
    dense = preset("tiny-v32", indexer_mode="dense", **fields)
    assert token_flops(dense, 1000)["attention"] == 4 * 2 * 4 * (2 * 64 + 16) * 1000


# ----------------------------------------------------------------- the V4 report's ratios
def test_published_ratios():
    """At 1M tokens against V3.2: KV 10 % (Pro) and 7 % (Flash) in DeepSeek's formats; FLOPs
    27 % and 10 % once weighted by precision. Plain FLOPs cannot give Flash's 10 %: its
    matmuls and its indexer are already that much of V3.2's."""
    rows = {r.name: r for r in compare()}
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        r, pub = rows[name], PUBLISHED[name]
        assert round(100 * r.kv_ratio) == round(100 * pub["kv"])
        assert abs(r.flops_ratio_fp8 - pub["flops"]) < 0.01
        assert r.kv_ratio < r.kv_ratio_bf16
    flash, base = rows["deepseek-v4-flash"], rows["deepseek-v3.2"]
    assert (flash.flops_parts["matmuls"] + flash.flops_parts["indexer"]) / base.flops >= 0.10
    assert 50e9 < base.kv_bytes < 51e9  # the report's Figure 1: "~50 GB"


# ----------------------------------------------------------------------------- capacity
def test_capacity_holds_the_v4_cache():
    cfg = preset("deepseek-v4-flash")
    a = Assumptions(qps=1, prompt_tokens=100_000, output_tokens=1000, kv_dtype="fp8", weight_dtype="fp8")
    p = plan_capacity(cfg, get_gpu("H200"), a)
    held = kv_cache_bytes(cfg, 101_000, uniform_dtypes("fp8"))
    assert p.kv_bytes == pytest.approx(p.concurrency * held)
    assert p.kv_bytes_per_token == pytest.approx(held / 101_000)
    assert p.decode_kv_bytes_per_step == pytest.approx(p.concurrency * kv_read_bytes(cfg, 100_500, uniform_dtypes("fp8")))
    # V4's release keeps the routed experts in FP4: V4-Flash's checkpoint is 160 GB
    assert round(weight_bytes(cfg, "fp8", include_mtp=True) / 1e9) == 160


# ---------------------------------------------------------------------------------- CLI
def test_cli_compare(tmp_path):
    r = CliRunner().invoke(app, ["calc", "compare", "--plot", str(tmp_path / "kv.png")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for word in ("deepseek-v4-pro", "27.0%", "7.0%", "1.6T / 49B", "50.40 GB"):
        assert word in r.stdout, word
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    d = json.loads(CliRunner().invoke(app, ["calc", "compare", "--ctx", "4096", "--json"]).stdout)
    assert d["context"] == 4096 and [x["name"] for x in d["rows"]][1] == "deepseek-v3.2"


@pytest.mark.parametrize("args", [["calc", "params"], ["calc", "kv", "--seq-len", "300"], ["calc", "flops"],
                                  ["plan", "capacity", "--qps", "1", "--prompt-tokens", "100", "--output-tokens", "10"]])
def test_cli_takes_v32_and_v4_configs(tmp_path, args):
    for name in ("tiny-v4", "tiny-v32"):
        r = CliRunner().invoke(app, args + ["--preset", name, "--json"])
        assert r.exit_code == 0, r.output
    preset("tiny-v4").to_json(tmp_path / "config.json")
    r = CliRunner().invoke(app, args + ["--config", str(tmp_path / "config.json")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output


def test_cli_kv_shows_each_cache():
    r = CliRunner().invoke(app, ["calc", "kv", "--preset", "deepseek-v4-pro", "--seq-len", "1048576", "--json"])
    d = json.loads(r.stdout)
    deepseek = next(s for s in d["schemes"] if s["dtypes"]["name"] == "deepseek")
    assert deepseek["sequence_bytes"] == kv_cache_bytes(preset("deepseek-v4-pro"), 1 << 20,
                                                        deepseek_dtypes(preset("deepseek-v4-pro")))
    assert {t["fmt"] for t in deepseek["terms"]} == {"fp8-v4", "fp4", "fp32"}
