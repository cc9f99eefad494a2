"""Serving capacity: a hand-computed plan, the bounds, the GPU table and the CLI."""

import json
import math

import pytest
from typer.testing import CliRunner

from nanoseek.calc.capacity import (Assumptions, expected_experts_touched, plan_capacity,
                                    weight_bytes, weight_bytes_read_per_step)
from nanoseek.calc.flops import decode_flops_per_token, prefill_flops_per_token
from nanoseek.calc.gpus import GPU, GPUS, get_gpu
from nanoseek.calc.params import count_params
from nanoseek.cli import app
from nanoseek.config import ConfigError, preset


def test_dense_plan_by_hand():
    cfg = preset("tiny", n_routed_experts=None)  # dense: every weight read every step
    gpu = GPU("toy", mem_gb=0.01, bw_tbs=0.001, bf16_tflops=1.0, gpus_per_node=4)
    a = Assumptions(qps=2, prompt_tokens=100, output_tokens=50, ttft_ms=1000, tpot_ms=50,
                    mfu=0.5, bw_util=0.5, mem_util=0.8)
    p = plan_capacity(cfg, gpu, a)
    assert p.latency_s == pytest.approx(1 + 50 * 0.05)
    assert p.concurrency == pytest.approx(2 * 3.5)
    w = count_params(cfg).main_total * 2
    kv_tok = (64 + 16) * 2 * 4  # MLA latent, bf16, 4 layers
    assert p.weights_bytes == w and p.kv_bytes_per_token == kv_tok
    assert p.kv_bytes == pytest.approx(7 * 150 * kv_tok)
    assert p.gpus_for_memory == pytest.approx((w + 7 * 150 * kv_tok) / (0.01e9 * 0.8))
    emb = 4096 * 256 * 2  # the embedding table is looked up, not read
    step = (w - emb) + 7 * (100 + 25) * kv_tok
    assert p.decode_bytes_per_step == pytest.approx(step)
    assert p.gpus_for_decode_bandwidth == pytest.approx(step / (0.001e12 * 0.5 * 0.05))
    flops = 2 * (100 * prefill_flops_per_token(cfg, 100) + 50 * decode_flops_per_token(cfg, 125))
    assert p.gpus_for_compute == pytest.approx(flops / 0.5e12)
    assert p.gpus_for_ttft == pytest.approx(100 * prefill_flops_per_token(cfg, 100) / 0.5e12)
    needs = [p.gpus_for_memory, p.gpus_for_decode_bandwidth, p.gpus_for_compute, p.gpus_for_ttft]
    assert p.gpus == math.ceil(max(needs))
    assert p.nodes == math.ceil(p.gpus / 4)
    assert p.decode_step_s <= 0.05 + 1e-12  # the plan meets its TPOT target


def test_more_traffic_needs_more_gpus():
    cfg, gpu = preset("deepseek-v3"), get_gpu("H200")
    small = plan_capacity(cfg, gpu, Assumptions(qps=1, prompt_tokens=1000, output_tokens=200))
    big = plan_capacity(cfg, gpu, Assumptions(qps=200, prompt_tokens=1000, output_tokens=200))
    assert big.gpus > small.gpus and big.concurrency == pytest.approx(200 * small.concurrency)
    # BF16 V3 (1.34 TB) does not fit one 141 GB node's worth of a single GPU
    assert small.gpus >= 1.34e12 / 141e9 / 0.9


def test_moe_weights_read():
    assert expected_experts_touched(256, 8, 1) == pytest.approx(8)
    assert expected_experts_touched(256, 8, 10_000) == pytest.approx(256)
    cfg = preset("deepseek-v3")
    one = weight_bytes_read_per_step(cfg, "bf16", 1)
    pc = count_params(cfg)
    assert one == pytest.approx(pc.main_activated * 2)  # one token reads its activated weights
    assert weight_bytes_read_per_step(cfg, "bf16", 1e5) == pytest.approx((pc.main_total - pc.total["embeddings"]) * 2)


def test_fp8_weights_like_the_release():
    cfg = preset("deepseek-v3")
    pc = count_params(cfg)
    q = sum(pc.total[c] for c in ("attention", "dense_ffn", "shared_experts", "routed_experts"))
    rest = pc.main_total - q
    assert weight_bytes(cfg, "fp8") == pytest.approx(q * (1 + 4 / 128 ** 2) + 2 * rest)
    assert 0.5 < weight_bytes(cfg, "fp8") / weight_bytes(cfg, "bf16") < 0.51


def test_fp8_peak_only_where_the_gpu_has_it():
    assert get_gpu("h100").tflops("fp8") == 1979 and get_gpu("A100").tflops("fp8") == 312


def test_bad_input():
    with pytest.raises(ConfigError, match="qps"):
        plan_capacity(preset("tiny"), get_gpu("H100"), Assumptions(qps=0, prompt_tokens=1, output_tokens=1))
    with pytest.raises(ConfigError, match="mfu"):
        plan_capacity(preset("tiny"), get_gpu("H100"), Assumptions(qps=1, prompt_tokens=1, output_tokens=1, mfu=2))
    with pytest.raises(ConfigError, match="unknown GPU"):
        get_gpu("TPUv9")


def test_cli(tmp_path):
    args = ["plan", "capacity", "--preset", "deepseek-v3", "--qps", "10", "--prompt-tokens", "2000",
            "--output-tokens", "500"]
    r = CliRunner().invoke(app, args + ["--gpu", "H800", "--weight-dtype", "fp8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["concurrency"] == pytest.approx(10 * (2 + 500 * 0.05))
    assert d["nodes"] == math.ceil(d["gpus"] / 8)
    r = CliRunner().invoke(app, args + ["--gpu", "custom", "--gpu-mem-gb", "192", "--gpu-bw-tbs", "8",
                                        "--gpu-tflops", "2250"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "concurrency" in r.stdout and "bound by" in r.stdout
    r = CliRunner().invoke(app, args + ["--gpu", "custom", "--gpu-mem-gb", "192"])
    assert r.exit_code != 0 and "--gpu-bw-tbs" in r.output
    f = tmp_path / "gpus.json"
    f.write_text(json.dumps({"MI300X": {"mem_gb": 192, "bw_tbs": 5.3, "bf16_tflops": 1307, "fp8_tflops": 2615}}))
    r = CliRunner().invoke(app, args + ["--gpu", "MI300X", "--gpu-file", str(f), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gpu"]["mem_gb"] == 192
    GPUS.pop("MI300X", None)
    f.write_text(json.dumps({"X": {"mem_gb": 1}}))
    r = CliRunner().invoke(app, args + ["--gpu", "X", "--gpu-file", str(f)])
    assert r.exit_code != 0 and "missing field" in r.output


def test_mtp_weights():
    cfg = preset("deepseek-v3")
    pc = count_params(cfg)
    assert weight_bytes(cfg, "bf16", include_mtp=True) - weight_bytes(cfg, "bf16") == 2 * pc.mtp
    extra_fp8 = weight_bytes(cfg, "fp8", include_mtp=True) - weight_bytes(cfg, "fp8")
    assert pc.mtp < extra_fp8 < 1.2 * pc.mtp  # mostly FP8 experts; eh_proj and norms in BF16


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_mtp_kv_is_counted_like_calc_kv_and_the_engine(kv_dtype):
    """--mtp keeps the MTP layers' latent cache too (the engine allocates num_hidden_layers +
    num_nextn_predict_layers cache layers when it drafts with MTP)."""
    from nanoseek.calc.kv import kv_bytes_per_token, kv_report
    cfg = preset("deepseek-v3")
    a = dict(qps=1, prompt_tokens=100, output_tokens=10, kv_dtype=kv_dtype)
    with_mtp = plan_capacity(cfg, GPUS["H800"], Assumptions(**a, include_mtp=True))
    without = plan_capacity(cfg, GPUS["H800"], Assumptions(**a))
    assert with_mtp.kv_bytes_per_token == kv_bytes_per_token(cfg, dtype=kv_dtype, include_mtp=True)
    row = next(r for r in kv_report(cfg, 1, 1, [kv_dtype], None, True)["rows"] if r["attention"] == "mla")
    assert with_mtp.kv_bytes_per_token == row["bytes_per_token"]
    assert with_mtp.kv_bytes_per_token * 61 == without.kv_bytes_per_token * 62
