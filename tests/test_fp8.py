"""Block-wise FP8: activation tiles, the FP8 linear (emulated and through torch._scaled_mm),
the error report, and BF16 <-> FP8 checkpoint conversion in DeepSeek-V3's layout."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import nanoseek
from nanoseek.checkpoint.hf import CheckpointError, save_pretrained
from nanoseek.cli import app
from nanoseek.config import preset
from nanoseek.model import CausalLM
from nanoseek.checkpoint.convert import convert, is_quantised
from nanoseek.quant.fp8 import (FP8, FP8_MAX, FP8Linear, dequantize_activation, dequantize_weight,
                                fp8_gemm_emulated, fp8_gemm_scaled_mm, quant_error,
                                quantize_activation, quantize_weight, weight_quant_error)


def test_activation_tiles():
    x = torch.randn(3, 5, 300)
    q, s = quantize_activation(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (3, 5, 3) and s.dtype == torch.float32
    # each 1x128 tile's absmax maps to the FP8 maximum
    assert torch.allclose(s[..., 0], x[..., :128].abs().amax(-1) / FP8_MAX)
    assert torch.allclose(s[..., 2], x[..., 256:].abs().amax(-1) / FP8_MAX)
    assert quant_error(x, dequantize_activation(q, s))["rel_error"] < 0.04  # E4M3: 3 mantissa bits


def test_tiles_isolate_outliers():
    """An outlier costs precision only to its own tile (why V3 scales per 1x128, not per tensor)."""
    x = torch.randn(1, 256)
    x[0, 3] = 1e6
    q, s = quantize_activation(x)
    y = dequantize_activation(q, s)
    assert quant_error(x[:, 128:], y[:, 128:])["rel_error"] < 0.04
    per_tensor = (x / (x.abs().max() / FP8_MAX)).to(FP8).float() * (x.abs().max() / FP8_MAX)
    assert quant_error(x[:, 128:], per_tensor[:, 128:])["rel_error"] > 0.5


def test_exact_values_round_trip():
    w = torch.tensor([[448.0, -2.0, 0.5, 0.0]]).repeat(4, 1)
    q, s = quantize_weight(w)
    assert torch.equal(dequantize_weight(q, s), w)
    e = weight_quant_error(w)
    assert e["rel_error"] == 0 and e["max_abs_error"] == 0 and e["ref_max_abs"] == 448


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (48, 130)])
def test_fp8_linear(shape):
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(2, 7, in_f)
    ref = lin(x)
    emu = FP8Linear.from_linear(lin, backend="emulate")
    y = emu(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert quant_error(ref, y)["rel_error"] < 0.06
    assert emu.weight.dtype == FP8 and emu.weight_scale_inv.shape == (-(-out_f // 128), -(-in_f // 128))
    # the tensor-core path (torch._scaled_mm, which torch also runs on CPU) gives the same GEMM
    mm = FP8Linear.from_linear(lin, backend="scaled_mm")
    assert quant_error(y, mm(x))["rel_error"] < 1e-5
    assert FP8Linear.from_linear(lin).forward(x).shape == ref.shape  # auto: emulation on CPU


def test_gemm_emulation_is_the_dequantised_product():
    x, w = torch.randn(16, 256), torch.randn(64, 256)
    xq, xs = quantize_activation(x)
    wq, ws = quantize_weight(w)
    manual = (xq.float() * xs.repeat_interleave(128, 1)) @ (wq.float() * ws.repeat_interleave(128, 0)[:64].repeat_interleave(128, 1)).T
    assert torch.allclose(fp8_gemm_emulated(xq, xs, wq, ws), manual)
    assert torch.allclose(fp8_gemm_scaled_mm(xq, xs, wq, ws), manual, rtol=1e-4, atol=1e-4)


def test_fp8_linear_rejects_bias_and_bad_backend():
    with pytest.raises(ValueError, match="bias"):
        FP8Linear.from_linear(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="backend"):
        FP8Linear(8, 8, backend="cuda")


# ---------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny")).eval()
    path = tmp_path_factory.mktemp("ckpt") / "bf16"
    save_pretrained(model, path, dtype=torch.bfloat16, max_shard_bytes=3 << 20)  # several shards
    (path / "tokenizer.json").write_text("{}")
    return path


def _logits(path, ids):
    with torch.no_grad():
        return nanoseek.from_pretrained(path).float()(ids)


def test_convert_round_trip(tiny_ckpt, tmp_path):
    fp8_dir, back = tmp_path / "fp8", tmp_path / "back"
    r = convert(tiny_ckpt, fp8_dir, "fp8", progress=False)
    assert r.quantised > 0 and r.rel_error_max < 0.04 and r.bytes_out < 0.7 * r.bytes_in  # tiny: embedding + copies are 1/3
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert (fp8_dir / "tokenizer.json").exists()
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    seen = {}
    for name, fname in index.items():
        with safe_open(str(fp8_dir / fname), "pt") as f:
            seen[name] = f.get_tensor(name)
    fp8_names = {n for n, t in seen.items() if t.dtype == FP8}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_names
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8_names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in fp8_names
    assert "model.layers.4.mlp.experts.0.gate_proj.weight" in fp8_names  # the MTP block's experts
    for n in fp8_names:
        s = seen[n + "_scale_inv"]
        M, N = seen[n].shape
        assert s.dtype == torch.float32 and s.shape == (-(-M // 128), -(-N // 128))
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight",
              "model.layers.4.eh_proj.weight", "model.layers.4.shared_head.head.weight"):
        assert seen[n].dtype != FP8 and n + "_scale_inv" not in seen, n
    ids = torch.randint(0, 4096, (2, 16))
    got = _logits(fp8_dir, ids)
    # the FP8 checkpoint decodes to exactly the source model with its weights quantised
    model = nanoseek.from_pretrained(tiny_ckpt).float()
    with torch.no_grad():
        ref = model(ids)
        for name, p in model.named_parameters():
            if is_quantised(name.replace("mtp.0.", "model.layers.4."), p):
                p.copy_(dequantize_weight(*quantize_weight(p)))
        assert torch.equal(model(ids), got)
    # close to the BF16 logits: ~2.7% error per weight compounds through a random-init
    # model (measured ~25-35% relative on the logits of this MoE, ~10% for a dense one)
    assert quant_error(ref, got)["rel_error"] < 0.5
    # back to high precision: exactly the weights the FP8 checkpoint decodes to
    convert(fp8_dir, back, "dequant", dtype="fp32", progress=False)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert torch.equal(_logits(back, ids), got)


def test_convert_errors(tiny_ckpt, tmp_path):
    convert(tiny_ckpt, tmp_path / "fp8", "fp8", progress=False)
    with pytest.raises(CheckpointError, match="already an FP8"):
        convert(tmp_path / "fp8", tmp_path / "x", "fp8", progress=False)
    with pytest.raises(CheckpointError, match="no FP8 weights"):
        convert(tiny_ckpt, tmp_path / "y", "dequant", progress=False)
    with pytest.raises(CheckpointError, match="not empty"):
        convert(tiny_ckpt, tmp_path / "fp8", "fp8", progress=False)
    with pytest.raises(CheckpointError, match="config.json"):
        convert(tmp_path, tmp_path / "z", "fp8", progress=False)


def test_which_tensors():
    w = torch.zeros(4, 4)
    assert is_quantised("model.layers.3.self_attn.q_b_proj.weight", w)
    assert is_quantised("model.layers.3.mlp.experts.7.up_proj.weight", w)
    assert not is_quantised("model.layers.3.mlp.gate.weight", w)
    assert not is_quantised("model.layers.61.eh_proj.weight", w)
    assert not is_quantised("model.layers.3.self_attn.kv_a_layernorm.weight", torch.zeros(4))
    assert not is_quantised("model.layers.3.mlp.shared_experts.up_proj.weight", torch.zeros(0, 4))


def test_convert_model_without_shared_experts(tmp_path):
    """Its checkpoint holds empty [0, D] shared-expert weights, as transformers writes them."""
    model = CausalLM(preset("tiny", n_shared_experts=0, num_hidden_layers=2)).eval()
    save_pretrained(model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "fp8", "fp8", "fp32", progress=False)
    ids = torch.randint(0, 4096, (1, 8))
    assert torch.isfinite(_logits(tmp_path / "fp8", ids)).all()


def test_cli_convert(tiny_ckpt, tmp_path):
    r = CliRunner().invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "fp8"), "--fp8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["direction"] == "fp8" and d["quantised"] > 0 and 0 < d["rel_error_mean"] < 0.04
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--dequant"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "dequantised" in r.stdout
    r = CliRunner().invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "x")])
    assert r.exit_code != 0 and "--quantization fp8 or --dequant" in r.output
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "fp8"), str(tmp_path / "y"), "--fp8"])
    assert r.exit_code != 0 and "already an FP8" in r.output
