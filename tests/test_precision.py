"""Inference precision: bf16 weights and latent cache, FP8 weights in the model (FP8Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import nanoseek
from nanoseek.calc.kv import dtype_name, kv_bytes_per_token
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.cli import app
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.dtype import cast_model
from nanoseek.checkpoint.convert import convert
from nanoseek.quant.fp8 import FP8, FP8Linear, dequantize_weight, quant_error
from nanoseek.quant.model import fp8_modules, model_bytes, quantization_backend, quantize_model_fp8
from tests.test_engine import prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(mtp=1)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "fp32"
    save_pretrained(model, path)
    return path


def dequantised_copy(fp8_model):
    """The same model with every FP8Linear replaced by a Linear holding its dequantised weight."""
    m = copy.deepcopy(fp8_model)
    for name, mod in list(m.named_modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, FP8Linear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data = child.dequantized_weight()
                setattr(mod, attr, lin)
    return m


# ------------------------------------------------------------------ FP8Linear
def test_fp8_linear_keeps_its_codes_through_dtype_casts():
    lin = FP8Linear.from_linear(torch.nn.Linear(200, 300, bias=False))
    codes, scales = lin.weight.clone(), lin.weight_scale_inv.clone()
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == FP8 and torch.equal(lin.weight.view(torch.uint8), codes.view(torch.uint8))
    assert lin.weight_scale_inv.dtype == torch.float32 and torch.equal(lin.weight_scale_inv, scales)
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    ref = x.float() @ dequantize_weight(codes, scales).T
    assert quant_error(ref, y)["rel_error"] < 0.05  # 1x128 activation tiles + bf16 output
    assert torch.equal(lin.dequantized_weight(), dequantize_weight(codes, scales))


# -------------------------------------------------------------- the FP8 model
def test_quantize_model_swaps_projections_only(model):
    q = quantize_model_fp8(copy.deepcopy(model))
    names = {n for n, m in q.named_modules() if isinstance(m, FP8Linear)}
    assert "model.layers.0.self_attn.kv_b_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert "model.layers.1.mlp.experts.5.up_proj" in names and "model.layers.1.mlp.shared_experts.gate_proj" in names
    assert "mtp.0.self_attn.q_a_proj" in names and "mtp.0.mlp.experts.0.down_proj" in names
    assert not [n for n in names if "gate." in n or "eh_proj" in n or "lm_head" in n or "embed" in n]
    assert isinstance(q.lm_head, torch.nn.Linear) and isinstance(q.mtp[0].eh_proj, torch.nn.Linear)
    assert q.model.layers[1].mlp.gate.weight.dtype == torch.float32
    # weights stay FP8 in memory: 1 byte per weight + one fp32 per 128x128 block
    assert model_bytes(q) < 0.45 * model_bytes(model)
    assert quantization_backend(q, "cpu") == "emulate"


def test_fp8_model_logits_are_close_to_its_dequantised_weights(model):
    """The only difference left is the 1x128 FP8 quantisation of the activations."""
    q = quantize_model_fp8(copy.deepcopy(model))
    ids = torch.tensor(prompts(4, seed=3, lo=12, hi=13))
    with torch.no_grad():
        got, ref = q(ids), dequantised_copy(q)(ids)
    err = quant_error(ref, got)
    # measured 0.098 relative L2: a random-init MoE, where a tile rounding that flips a
    # near-tied expert choice moves a whole row (the dense layers alone: ~0.02)
    assert err["rel_error"] < 0.15, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75  # measured 0.875 (42 of 48)


def test_engine_fp8_greedy_equals_the_quantised_models_own_greedy(model):
    q = quantize_model_fp8(copy.deepcopy(model))
    load = prompts(6, seed=5)
    llm = LLM(copy.deepcopy(model), quantization="fp8", kv_cache_memory="4MiB")
    assert llm.quantization_backend == "emulate" and len(fp8_modules(llm.engine.model)) == len(fp8_modules(q))
    outs = llm.generate(load, GREEDY, use_tqdm=False)
    for p, out in zip(load, outs):
        # prefill decompresses, decode attends over the latents (W_UKV dequantised): as the engine
        want = q.generate(torch.tensor([p]), GREEDY.max_tokens, eos_token_id=1)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == want[:len(out.outputs[0].token_ids)]


def test_fp8_checkpoint_codes_are_kept_as_stored(ckpt, tmp_path):
    convert(ckpt, tmp_path / "fp8", "fp8", dtype="fp32", progress=False)
    m = nanoseek.from_pretrained(tmp_path / "fp8", quantization="fp8")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        codes, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    mod = m.model.layers[1].mlp.experts[2].up_proj
    assert isinstance(mod, FP8Linear)
    assert torch.equal(mod.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(mod.weight_scale_inv, scale)
    # a high-precision checkpoint with quantization="fp8" is quantised as it is read: same codes
    m2 = nanoseek.from_pretrained(ckpt, quantization="fp8")
    assert torch.equal(m2.model.layers[1].mlp.experts[2].up_proj.weight.view(torch.uint8), codes.view(torch.uint8))
    # and an FP8 model saves in DeepSeek's layout, read back unchanged
    save_pretrained(m, tmp_path / "again", dtype=torch.bfloat16)
    m3 = nanoseek.from_pretrained(tmp_path / "again", quantization="fp8")
    assert torch.equal(m3.model.layers[1].mlp.experts[2].up_proj.weight_scale_inv, scale)
    ids = torch.tensor(prompts(2, seed=7, lo=9, hi=10))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_quantise_after_loading_in_bf16_keeps_codes(ckpt):
    """FP8 weights survive a later dtype cast: model.to(bf16) must not turn codes into numbers."""
    m = nanoseek.from_pretrained(ckpt, quantization="fp8")
    codes = m.model.layers[0].self_attn.o_proj.weight.clone()
    cast_model(m, torch.bfloat16)
    assert m.model.layers[0].self_attn.o_proj.weight.dtype == FP8
    assert torch.equal(m.model.layers[0].self_attn.o_proj.weight.view(torch.uint8), codes.view(torch.uint8))
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------- bf16
def test_cast_model_keeps_router_and_rope_in_fp32(model):
    m = cast_model(copy.deepcopy(model), torch.bfloat16)
    gate = m.model.layers[1].mlp.gate
    assert m.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, model.model.layers[1].mlp.gate.weight)
    assert m.rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token_follow_the_dtype_and_match_calc_kv(model, dtype):
    llm = LLM(copy.deepcopy(model), dtype=dtype, kv_cache_memory="2MiB")
    cache = llm.engine.cache
    assert cache.kv[0].dtype == getattr(torch, dtype)
    measured = cache.nbytes // cache.capacity_tokens
    cfg = model.config
    assert measured == kv_bytes_per_token(cfg, dtype=dtype_name(cache.kv[0].dtype), include_mtp=True)
    assert measured == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 3 * (4 if dtype == "float32" else 2)


def test_bf16_engine_generates_and_mostly_agrees_with_fp32(model):
    load = prompts(6, seed=2)
    fp32 = LLM(copy.deepcopy(model), kv_cache_memory="4MiB").generate(load, GREEDY, use_tqdm=False)
    bf16 = LLM(copy.deepcopy(model), dtype="bf16", kv_cache_memory="4MiB").generate(load, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in bf16)
    first = [a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(fp32, bf16)]
    assert sum(first) >= 4  # rounding may flip a near-tie, not most first tokens


def test_auto_dtype_is_the_checkpoints(model, tmp_path):
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    llm = LLM(tmp_path / "bf16", dtype="auto", kv_cache_memory="2MiB")
    assert llm.engine.cache.kv[0].dtype == torch.bfloat16
    assert llm.engine.model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert LLM(tmp_path / "bf16", kv_cache_memory="2MiB").engine.cache.kv[0].dtype == torch.float32


def test_bad_dtype_and_quantization_are_one_line_naming_the_choices(model):
    with pytest.raises(ValueError, match=r"dtype='int8'.*'auto'.*'float32'.*'bfloat16'") as e:
        LLM(copy.deepcopy(model), dtype="int8")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"quantization='int4'.*\['fp8'\]"):
        LLM(copy.deepcopy(model), quantization="int4")


def test_cli_generate_dtype_and_quantization(ckpt):
    r = CliRunner().invoke(app, ["generate", str(ckpt), "--prompt-ids", "5,6,7", "--max-tokens", "4",
                                 "--dtype", "bf16", "--quantization", "fp8", "--kv-cache-memory", "2MiB"])
    assert r.exit_code == 0, r.output
    assert "FP8 weights, GEMM: emulate" in r.output
    r = CliRunner().invoke(app, ["generate", str(ckpt), "--prompt-ids", "5", "--dtype", "fp64"])
    assert r.exit_code != 0 and "'--dtype': 'fp64' is not one of" in r.output


def test_scaled_mm_path_gives_the_emulated_numbers(model):
    """torch._scaled_mm (FP8 tensor cores on sm_89+; torch also runs it on CPU) and the
    dequantise-on-the-fly path compute the same GEMM, up to the order of the additions."""
    ids = torch.tensor(prompts(2, seed=4, lo=10, hi=11))
    emu = quantize_model_fp8(copy.deepcopy(model), backend="emulate")
    mm = quantize_model_fp8(copy.deepcopy(model), backend="scaled_mm")
    assert quantization_backend(mm, "cpu") == "scaled_mm" and quantization_backend(emu, "cpu") == "emulate"
    with torch.no_grad():
        assert quant_error(emu(ids), mm(ids))["rel_error"] < 1e-5
