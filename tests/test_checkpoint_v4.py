"""DeepSeek-V3.2 and V4 checkpoints: every tensor's name both ways (DeepSeek's release,
transformers' save_pretrained, transformers' in-memory fused experts), round trips through
transformers with the same logits, and the quantised formats (FP8 with UE8M0 block scales,
FP4 E2M1 experts with per-32 UE8M0 scales) dequantised exactly or refused in one line."""

import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import names
from nanoseek.checkpoint.hf import CheckpointError
from nanoseek.model import CausalLM
from nanoseek.quant.fp4 import dequantize_fp4, quantize_fp4
from nanoseek.quant.fp8 import E8M0, dequantize_weight, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


# ------------------------------------------------------------------ helpers
def hf_kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}


def tf_v4(cfg):
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_kwargs(cfg))).eval()
    _realistic(model, cfg)
    return model


def tf_v32(cfg):
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**hf_kwargs(cfg))).eval()
    _realistic(model, cfg)
    return model


@torch.no_grad()
def _realistic(model, cfg, seed: int = 0):
    """Weights of an initialised model (std 0.02), norms and mHC scales near 1, random sinks,
    router biases and hash tables, so every tensor reaches the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():  # shares the parameters' and buffers' storage
        if not t.is_floating_point():
            if name.endswith("tid2eid"):
                t.copy_(torch.randint(0, cfg.n_routed_experts, t.shape, generator=g))
            continue
        if "inv_freq" in name:
            continue
        if t.dim() == 1 or name.endswith(("scale", "hc_scale")):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.02 * torch.randn(t.shape, generator=g))
        if name.endswith(("base", "sinks", "e_score_correction_bias", "position_bias", "k_norm.bias")):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model


def disk_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def ns_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' V4 files declare an MTP layer they never write
        return CausalLM.from_pretrained(path, **kw)


def tf_load(cls, path):
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


# The names of DeepSeek's V4 reference (inference/model.py: Transformer, Block, Attention,
# Compressor, Indexer, MoE, Gate, Expert, MTPBlock), with their shapes, spelled out from
# that code rather than from nanoseek's table.
def deepseek_v4_names(cfg) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    D, H, hd, n, E = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult, cfg.n_routed_experts
    I, ql, g, r, V = cfg.moe_intermediate_size, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.vocab_size
    f32 = torch.float32
    out = {"embed.weight": ((V, D), f32), "head.weight": ((V, D), f32), "norm.weight": ((D,), f32),
           "hc_head_fn": ((n, n * D), f32), "hc_head_base": ((n,), f32), "hc_head_scale": ((1,), f32)}

    def compressor(p, ratio, dim):
        coff = 1 + (ratio == cfg.compress_rate_csa)  # the overlapping CSA compressor is twice as wide
        out.update({p + "ape": ((ratio, coff * dim), f32), p + "wkv.weight": ((coff * dim, D), f32),
                    p + "wgate.weight": ((coff * dim, D), f32), p + "norm.weight": ((dim,), f32)})

    def block(p, layer_id):
        out.update({p + "attn.attn_sink": ((H,), f32), p + "attn.wq_a.weight": ((ql, D), f32),
                    p + "attn.q_norm.weight": ((ql,), f32), p + "attn.wq_b.weight": ((H * hd, ql), f32),
                    p + "attn.wkv.weight": ((hd, D), f32), p + "attn.kv_norm.weight": ((hd,), f32),
                    p + "attn.wo_a.weight": ((g * r, H * hd // g), f32), p + "attn.wo_b.weight": ((D, g * r), f32),
                    p + "attn_norm.weight": ((D,), f32), p + "ffn_norm.weight": ((D,), f32),
                    p + "ffn.gate.weight": ((E, D), f32)})
        ratio = cfg.compress_rate(cfg.layer_type(layer_id))
        if ratio:
            compressor(p + "attn.compressor.", ratio, hd)
        if ratio == cfg.compress_rate_csa:
            compressor(p + "attn.indexer.compressor.", ratio, cfg.index_head_dim)
            out.update({p + "attn.indexer.wq_b.weight": ((cfg.index_n_heads * cfg.index_head_dim, ql), f32),
                        p + "attn.indexer.weights_proj.weight": ((cfg.index_n_heads, D), f32)})
        for hc in ("attn", "ffn"):
            out.update({f"{p}hc_{hc}_fn": (((2 + n) * n, n * D), f32), f"{p}hc_{hc}_base": (((2 + n) * n,), f32),
                        f"{p}hc_{hc}_scale": ((3,), f32)})
        if cfg.is_hash_layer(layer_id):
            out[p + "ffn.gate.tid2eid"] = ((V, cfg.num_experts_per_tok), torch.int32)
        else:
            out[p + "ffn.gate.bias"] = ((E,), f32)
        for e in [f"experts.{i}" for i in range(E)] + ["shared_experts"]:
            out.update({f"{p}ffn.{e}.w1.weight": ((I, D), f32), f"{p}ffn.{e}.w3.weight": ((I, D), f32),
                        f"{p}ffn.{e}.w2.weight": ((D, I), f32)})

    for i in range(cfg.num_hidden_layers):
        block(f"layers.{i}.", i)
    for k in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{k}."
        block(p, cfg.num_hidden_layers + k)
        out.update({p + "e_proj.weight": ((D, D), f32), p + "h_proj.weight": ((D, D), f32),
                    p + "enorm.weight": ((D,), f32), p + "hnorm.weight": ((D,), f32), p + "norm.weight": ((D,), f32),
                    p + "hc_head_fn": ((n, n * D), f32), p + "hc_head_base": ((n,), f32), p + "hc_head_scale": ((1,), f32)})
    return out


def deepseek_tensors(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in deepseek_v4_names(cfg).items():
        if dtype == torch.int32:
            out[name] = torch.randint(0, cfg.n_routed_experts, shape, generator=g, dtype=torch.int32)
        elif len(shape) == 1 or name.endswith("_scale"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=g)
        if name.endswith(("_base", "attn_sink", "gate.bias", "ape")):
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


def write_checkpoint(path, cfg, tensors, quantization_config=None):
    path.mkdir(parents=True, exist_ok=True)
    raw = cfg.to_dict()
    if quantization_config is not None:
        raw["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def v4():
    return nanoseek.preset("tiny-v4")


@pytest.fixture(scope="module")
def v32():
    return nanoseek.preset("tiny-v32")


@pytest.fixture(scope="module")
def release(v4):
    """DeepSeek-named tensors of tiny-v4, and the same in DeepSeek-V4-Flash's quantised layout."""
    tensors = deepseek_tensors(v4)
    return tensors, *_quantise_release(v4, tensors)


@pytest.fixture
def ids(v4):
    return torch.randint(0, v4.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ names both ways
def test_v4_transformers_saved_names_map_one_to_one(v4, tmp_path):
    """Every tensor transformers writes maps to one nanoseek name and back to itself."""
    tf_v4(v4).save_pretrained(tmp_path)
    disk = sorted(disk_tensors(tmp_path))
    ours = [names.from_disk(d, v4) for d in disk]
    assert len(set(ours)) == len(disk) and None not in ours
    assert [names.to_disk(n, v4) for n in ours] == disk
    model_keys = {k for k in CausalLM(v4).state_dict() if not k.startswith("mtp.")}
    assert set(ours) == model_keys


def test_v4_in_memory_names_split_the_fused_experts(v4, tmp_path):
    """transformers' in-memory spelling: gate_up_proj [E, 2I, D] is w1 then w3 of each expert."""
    model = tf_v4(v4)
    model.save_pretrained(tmp_path)
    disk = disk_tensors(tmp_path)
    split = [p for n, t in model.state_dict().items() for p in names.from_disk_tensors(n, t, v4)]
    assert len(split) == len(disk) == len({k for k, _ in split})
    for key, t in split:
        assert torch.equal(t, disk[names.to_disk(key, v4)]), key


def test_v4_deepseek_release_names_load_in_nanoseek_and_transformers(v4, release, tmp_path, ids):
    """DeepSeek's own names (no `model.`, `attn.kv_norm`, `hc_head_fn`, int32 tid2eid, MTP as
    mtp.0.*): nanoseek takes every tensor, transformers (its renaming table) reads the same
    weights, and the logits agree."""
    tensors = release[0]
    ours = {names.from_disk(n, v4) for n in tensors}
    assert ours == set(CausalLM(v4).state_dict()) and len(ours) == len(tensors)
    path = write_checkpoint(tmp_path / "ds", v4, tensors)
    ns = ns_load(path)
    state = ns.state_dict()
    for n, t in tensors.items():
        assert torch.equal(state[names.from_disk(n, v4)], t.to(state[names.from_disk(n, v4)].dtype)), n
    tf, info = tf_load(transformers.DeepseekV4ForCausalLM, path)
    assert not any(info.values())  # mtp.* is skipped by transformers' own ignore list
    assert (logits(ns, ids) - logits(tf, ids)).abs().max() <= TOL


def test_v4_transformers_to_nanoseek_to_transformers(v4, tmp_path, ids):
    tf = tf_v4(v4)
    tf.save_pretrained(tmp_path / "tf")
    ns = ns_load(tmp_path / "tf")
    ref = logits(tf, ids)
    assert (logits(ns, ids) - ref).abs().max() <= TOL
    ns.save_pretrained(tmp_path / "ns")
    a, b = disk_tensors(tmp_path / "tf"), disk_tensors(tmp_path / "ns")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back, info = tf_load(transformers.DeepseekV4ForCausalLM, tmp_path / "ns")
    assert not any(info.values())
    assert (logits(back, ids) - ref).abs().max() <= TOL


def test_v4_born_in_nanoseek_loads_in_transformers_with_its_mtp(v4, tmp_path, ids):
    """nanoseek writes transformers' names for the main model and DeepSeek's mtp.0.* for the
    MTP block (which transformers skips), and reads all of it back."""
    ns = _realistic(CausalLM(v4), v4).eval()
    ns.save_pretrained(tmp_path)
    disk = disk_tensors(tmp_path)
    assert {n for n in disk if n.startswith("mtp.")} == {n for n in deepseek_v4_names(v4) if n.startswith("mtp.")}
    tf, info = tf_load(transformers.DeepseekV4ForCausalLM, tmp_path)
    assert not any(info.values())
    assert (logits(ns, ids) - logits(tf, ids)).abs().max() <= TOL
    again = ns_load(tmp_path).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ns.state_dict().items())


def test_v32_round_trips_both_ways(v32, tmp_path, ids):
    """V3.2's indexer (`self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`) is spelled alike
    by DeepSeek's release and transformers: V3's names plus these."""
    ids = ids % v32.vocab_size
    tf = tf_v32(v32)
    tf.save_pretrained(tmp_path / "tf")
    ns = ns_load(tmp_path / "tf")
    ref = logits(tf, ids)
    assert (logits(ns, ids) - ref).abs().max() <= TOL
    ns.save_pretrained(tmp_path / "ns")
    a, b = disk_tensors(tmp_path / "tf"), disk_tensors(tmp_path / "ns")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".self_attn.indexer.k_norm.bias" in k for k in a)
    back, _ = tf_load(transformers.DeepseekV32ForCausalLM, tmp_path / "ns")
    assert torch.equal(logits(back, ids), ref)
    born = _realistic(CausalLM(v32), v32).eval()  # with its MTP layer, at model.layers.{L}
    born.save_pretrained(tmp_path / "born")
    tf, info = tf_load(transformers.DeepseekV32ForCausalLM, tmp_path / "born")
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{v32.num_hidden_layers}.") for k in info["unexpected_keys"])
    assert (logits(born, ids) - logits(tf, ids)).abs().max() <= TOL
    again = ns_load(tmp_path / "born").state_dict()
    assert all(torch.equal(again[k], v) for k, v in born.state_dict().items())


# ------------------------------------------------------------------ FP4 and UE8M0
def _e2m1_by_bits(nibbles: torch.Tensor) -> torch.Tensor:
    """E2M1 decoded from its bits (sign, 2 exponent bits with bias 1, 1 mantissa bit)."""
    sign = 1 - 2 * ((nibbles >> 3) & 1).float()
    exp, man = ((nibbles >> 1) & 3).float(), (nibbles & 1).float()
    mag = torch.where(exp == 0, 0.5 * man, torch.exp2(exp - 1) * (1 + 0.5 * man))
    return sign * mag


def _ue8m0_by_bits(scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.view(torch.uint8).double() - 127)


def test_fp4_dequantisation_is_exact():
    """Random weights through nanoseek's encoder; the decoder against one from the bits, and
    against transformers' Fp8Dequantize (its FP4 path)."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, :40] *= 50  # groups of very different ranges
    packed, scale = quantize_fp4(w)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (64, 48)
    assert scale.dtype == E8M0 and tuple(scale.shape) == (64, 3)
    b = packed.view(torch.uint8)
    values = torch.stack([_e2m1_by_bits(b & 15), _e2m1_by_bits(b >> 4)], -1).flatten(-2).double()
    by_hand = values * _ue8m0_by_bits(scale).repeat_interleave(32, dim=1)
    got = dequantize_fp4(packed, scale)
    assert torch.equal(got.double(), by_hand)
    assert torch.equal(dequantize_fp4(packed.view(torch.float4_e2m1fn_x2), scale), got)
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    assert torch.equal(Fp8Dequantize(None)._dequantize_one(packed, scale, torch.float32), got)
    assert ((got - w).abs() <= _ue8m0_by_bits(scale).float().repeat_interleave(32, 1)).all()  # half a step of 2


def test_fp4_encoder_keeps_representable_values():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    w = (grid[torch.randint(0, 8, (4, 64))] * torch.where(torch.rand(4, 64) < 0.5, -1.0, 1.0)) * 2.0 ** -5
    w[:, 0] = 6 * 2.0 ** -5  # each group's largest magnitude sets the scale to 2^-5
    w[:, 32] = -6 * 2.0 ** -5
    assert torch.equal(dequantize_fp4(*quantize_fp4(w)), w)
    halfway = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])  # ties go to the even code
    w[:, 1:9] = halfway * 2.0 ** -5
    assert torch.equal(dequantize_fp4(*quantize_fp4(w))[:, 1:9],
                       torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]).expand(4, -1) * 2.0 ** -5)


def test_fp8_ue8m0_block_scales_are_exact():
    """V3.1+/V4 block scales are powers of two: stored as float8_e8m0fnu they lose nothing,
    partial last blocks included."""
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = quantize_weight(w, scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    e8 = s.to(E8M0)
    assert torch.equal(e8.float(), s)
    per_elem = _ue8m0_by_bits(e8).repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert torch.equal(dequantize_weight(q, e8).double(), q.double() * per_elem)
    assert (q.float().abs().amax() <= 448)
    v3_q, v3_s = quantize_weight(w)  # the V3 path is untouched: amax / 448 scales
    assert torch.allclose(v3_s, torch.stack([b.abs().amax() for b in w.split(128, 0) for b in b.split(128, 1)])
                          .view(2, 3) / 448)


def _quantise_release(cfg, tensors):
    """DeepSeek-V4-Flash's layout: routed experts FP4 (int8 + per-32 UE8M0 `.scale`), the
    other Linears of attention and the shared experts FP8 E4M3 (+ 128x128 UE8M0 `.scale`).
    Returns the tensors and what each quantised weight must read as."""
    out, want = {}, {}
    for name, t in tensors.items():
        if ".experts." in name and ".shared_experts." not in name:
            q, s = quantize_fp4(t)
            want[name] = dequantize_fp4(q, s)
        elif name.endswith(".weight") and t.dim() == 2 and (".attn.w" in name or "shared_experts" in name):
            q, s = quantize_weight(t, scale_fmt="ue8m0")
            s = s.to(E8M0)
            want[name] = dequantize_weight(q, s)
        else:
            out[name] = t
            continue
        out[name], out[name.removesuffix("weight") + "scale"] = q, s
    return out, want


QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "scale_fmt": "ue8m0", "weight_block_size": [128, 128], "expert_dtype": "fp4"}


def test_v4_flash_layout_dequantises_exactly(v4, release, tmp_path):
    """Every quantised weight reads as its codes times its scales, and as transformers'
    dequantising loader (FineGrainedFP8Config(dequantize=True)) reads it, bit for bit."""
    _, tensors, want = release
    assert any(t.dtype == torch.int8 for t in tensors.values()) and any(t.dtype == E8M0 for t in tensors.values())
    path = write_checkpoint(tmp_path / "q", v4, tensors, QUANT_CONFIG)
    state = ns_load(path).state_dict()
    for name, w in want.items():
        assert torch.equal(state[names.from_disk(name, v4)], w), name
    fp8 = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=[128, 128], scale_fmt="ue8m0")
    tf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=fp8,
                                                                  output_loading_info=True)
    assert not any(info.values())
    theirs = [p for n, t in tf.state_dict().items() for p in names.from_disk_tensors(n, t, v4)]
    assert len(theirs) == len([k for k in state if not k.startswith("mtp.")])
    assert all(torch.equal(t, state[k]) for k, t in theirs)


# ------------------------------------------------------------------ refusals
def _refusal(v4, release, tmp_path, edit, quantization_config=QUANT_CONFIG) -> str:
    tensors = dict(release[1])
    edit(tensors)
    path = write_checkpoint(tmp_path / "bad", v4, tensors, quantization_config)
    with pytest.raises(CheckpointError) as e:
        ns_load(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


EXPERT = "layers.1.ffn.experts.2.w1"
ATTN = "layers.0.attn.wq_b"


def test_unknown_code_dtype_beside_a_scale_is_refused(v4, release, tmp_path):
    def to_uint8(t):
        t[EXPERT + ".weight"] = t[EXPERT + ".weight"].view(torch.uint8)
    msg = _refusal(v4, release, tmp_path, to_uint8)
    assert EXPERT + ".weight" in msg and "uint8" in msg


def test_fp4_scales_of_the_wrong_layout_are_refused(v4, release, tmp_path):
    def per_64(t):
        t[EXPERT + ".scale"] = t[EXPERT + ".scale"][:, ::2].contiguous()
    msg = _refusal(v4, release, tmp_path, per_64)
    assert EXPERT + ".scale" in msg and "FP4" in msg


def test_integer_scales_are_refused(v4, release, tmp_path):
    def raw_bytes(t):
        t[ATTN + ".scale"] = t[ATTN + ".scale"].view(torch.uint8)
    msg = _refusal(v4, release, tmp_path, raw_bytes)
    assert ATTN + ".scale" in msg and "uint8" in msg


def test_fp4_without_scales_is_refused(v4, release, tmp_path):
    def drop(t):
        t[EXPERT + ".weight"] = t[EXPERT + ".weight"].view(torch.float4_e2m1fn_x2)
        del t[EXPERT + ".scale"]
    msg = _refusal(v4, release, tmp_path, drop)
    assert EXPERT + ".weight" in msg and "missing" in msg


@pytest.mark.parametrize("field,value", [("weight_block_size", [32, 32]), ("expert_dtype", "int4"),
                                         ("quant_method", "awq"), ("fmt", "e5m2")])
def test_quantization_configs_of_other_formats_are_refused(v4, release, tmp_path, field, value):
    msg = _refusal(v4, release, tmp_path, lambda t: None, {**QUANT_CONFIG, field: value})
    assert f"quantization_config.{field}" in msg and repr(value) in msg


def test_convert_dequantises_the_v4_release_and_refuses_fp8_for_v4(v4, release, tmp_path):
    """`nanoseek convert --dequant` reads V4's `.scale` layout (FP8 UE8M0 and FP4 experts) and
    writes plain tensors that load as the quantised checkpoint does; --fp8 refuses V4."""
    from nanoseek.checkpoint.convert import convert

    _, tensors, want = release
    src = write_checkpoint(tmp_path / "q", v4, tensors, QUANT_CONFIG)
    report = convert(src, tmp_path / "bf", to="dequant", dtype="fp32", progress=False)
    assert report.quantised == len(want)
    raw = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert "quantization_config" not in raw
    a, b = ns_load(src).state_dict(), ns_load(tmp_path / "bf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="DeepSeek-V4"):
        convert(tmp_path / "bf", tmp_path / "f8", to="fp8", progress=False)


# ------------------------------------------------------------------ review fixes
def _header_dtypes(path) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in disk_tensors(path).items()}


def test_convert_dequant_to_bf16_keeps_what_the_model_keeps_in_fp32(v4, release, tmp_path):
    """DeepSeek's spelling of V4's FP32 tensors (router `ffn.gate.{weight,bias}`, mHC
    `hc_*_{fn,base,scale}`, `attn_sink`, `compressor.ape`) stays FP32 under --dtype bf16;
    the rest (norms included, as in DeepSeek's release) goes to bf16."""
    from nanoseek.checkpoint.convert import convert

    _, tensors, _ = release
    src = write_checkpoint(tmp_path / "q", v4, tensors, QUANT_CONFIG)
    convert(src, tmp_path / "bf", to="dequant", dtype="bf16", progress=False)
    got = _header_dtypes(tmp_path / "bf")
    fp32 = {n for n in got if n.endswith(("ffn.gate.weight", "ffn.gate.bias", "attn_sink", "compressor.ape"))
            or "hc_" in n}
    assert {n for n in fp32 if n.endswith("gate.bias")} and {n for n in fp32 if n.endswith(".ape")}
    assert {n for n in fp32 if n.startswith("mtp.") and "hc_head" in n}
    for n, dtype in got.items():
        want = torch.int32 if n.endswith("tid2eid") else torch.float32 if n in fp32 else torch.bfloat16
        assert dtype == want, n
    ns_load(tmp_path / "bf")  # and it loads


def _fp8_model(cfg):
    from nanoseek.quant.model import quantize_model_fp8
    return quantize_model_fp8(_realistic(CausalLM(cfg), cfg).eval())


def test_fp8_model_saves_v3_quantization_config_and_transformers_reads_it(tmp_path):
    """FP8Linear weights are saved as E4M3 codes + weight_scale_inv; without V3's
    quantization_config transformers would read the codes as values."""
    from tests.conftest import tiny_config
    cfg = tiny_config(num_nextn_predict_layers=0, hidden_size=256, intermediate_size=384)
    _fp8_model(cfg).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    assert any(t.dtype == torch.float8_e4m3fn for t in disk_tensors(tmp_path).values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (logits(hf, ids) - logits(ns_load(tmp_path), ids)).abs().max() <= 1e-4


def test_fp8_v32_model_saves_the_quantization_config(v32, tmp_path):
    _fp8_model(v32).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    plain = tmp_path / "plain"
    CausalLM(v32).save_pretrained(plain)  # no FP8 tensors, no quantization_config
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())


def test_fp8_v4_model_is_refused_on_save(v4, tmp_path):
    with pytest.raises(CheckpointError) as e:
        _fp8_model(v4).save_pretrained(tmp_path / "out")
    assert "\n" not in str(e.value) and "V4" in str(e.value) and "FP8" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_transformers_default_fp8_config_scale_fmt_float_is_read(v4, release, tmp_path):
    """FineGrainedFP8Config writes scale_fmt "float" (FP32 scales) by default."""
    qc = json.loads(transformers.FineGrainedFP8Config().to_json_string())
    assert qc["scale_fmt"] == "float"
    _, tensors, want = release
    state = ns_load(write_checkpoint(tmp_path / "q", v4, tensors, {**qc, "expert_dtype": "fp4"})).state_dict()
    assert all(torch.equal(state[names.from_disk(n, v4)], w) for n, w in want.items())


def test_convert_fp8_quantises_the_v32_indexer_as_deepseek_stores_it(v32, tmp_path):
    """DeepSeek's V3.2 release: indexer wq_b and wk in FP8 (+ weight_scale_inv), weights_proj BF16."""
    from nanoseek.checkpoint.convert import convert
    model = _realistic(CausalLM(v32), v32).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "fp8", "fp8", dtype="fp32", progress=False)
    got = disk_tensors(tmp_path / "fp8")
    indexer = sorted(n for n in got if ".indexer." in n and n.endswith(".weight"))
    assert indexer
    for n in indexer:
        fp8 = n.endswith(("indexer.wq_b.weight", "indexer.wk.weight"))
        assert (got[n].dtype == torch.float8_e4m3fn) == fp8, n
        assert (n + "_scale_inv" in got) == fp8, n
    assert any(n.endswith("indexer.weights_proj.weight") for n in indexer)
    state = ns_load(tmp_path / "fp8").state_dict()
    for n in indexer:
        if n.endswith("indexer.wk.weight"):
            assert torch.equal(state[names.from_disk(n, v32)], dequantize_weight(got[n], got[n + "_scale_inv"]))


@pytest.mark.parametrize("drop,named", [("layers.0.attn.attn_sink", "layers.0.attn.attn_sink"),
                                        ("embed.weight", "embed.weight"),
                                        ("layers.2.ffn.gate.bias", "layers.2.ffn.gate.bias")])
def test_missing_v4_tensor_is_named_in_the_checkpoints_spelling(v4, release, tmp_path, drop, named):
    msg = _refusal(v4, release, tmp_path, lambda t: t.pop(drop))
    assert f"{named!r} is missing" in msg


def test_missing_v4_tensor_in_transformers_spellings(v4, tmp_path):
    tf = tf_v4(v4)
    tf.save_pretrained(tmp_path / "saved")
    tensors = disk_tensors(tmp_path / "saved")
    del tensors["model.layers.0.attn.norm.weight"]
    with pytest.raises(CheckpointError, match="'model.layers.0.attn.norm.weight' is missing"):
        ns_load(write_checkpoint(tmp_path / "a", v4, tensors))
    memory = {k: v for k, v in tf.state_dict().items() if k != "model.layers.1.mlp.experts.down_proj"}
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.experts.down_proj' is missing"):
        ns_load(write_checkpoint(tmp_path / "b", v4, memory))


@pytest.mark.parametrize("declared", [True, False])
def test_int8_fp4_codes_without_scale_say_the_scale_is_missing(v4, release, tmp_path, declared):
    qc = QUANT_CONFIG if declared else {k: v for k, v in QUANT_CONFIG.items() if k != "expert_dtype"}
    msg = _refusal(v4, release, tmp_path, lambda t: t.pop(EXPERT + ".scale"), qc)
    assert f"{EXPERT + '.scale'!r} is missing" in msg and EXPERT + ".weight" in msg


@pytest.mark.parametrize("value", ["fp8", [1, 2], 3])
def test_a_quantization_config_that_is_not_an_object_is_refused(v4, release, tmp_path, value):
    msg = _refusal(v4, release, tmp_path, lambda t: None, value)
    assert "config.json" in msg and "quantization_config" in msg and repr(value) in msg


def test_v4_fp8_scale_of_the_wrong_shape_is_called_scale(v4, release, tmp_path):
    def extra_row(t):
        t[ATTN + ".scale"] = torch.cat([t[ATTN + ".scale"], t[ATTN + ".scale"][:1]])
    msg = _refusal(v4, release, tmp_path, extra_row)
    assert ATTN + ".scale" in msg and "scale has shape" in msg and "scale_inv" not in msg


def test_convert_help_describes_v4():
    from typer.testing import CliRunner
    from nanoseek.cli import app
    r = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = " ".join(r.output.replace("│", " ").split())
    assert "V4" in text and ".scale" in text and "UE8M0" in text and "FP4" in text
    assert "refuses a DeepSeek-V4" in text


def test_convert_counts_the_bytes_the_source_stores(v4, release, tmp_path):
    """FP4 experts (packed, half a byte a weight) and UE8M0 scales (one byte) as stored."""
    from nanoseek.checkpoint.convert import convert
    _, tensors, _ = release
    src = write_checkpoint(tmp_path / "q", v4, tensors, QUANT_CONFIG)
    report = convert(src, tmp_path / "bf", to="dequant", dtype="bf16", progress=False)
    assert report.bytes_in == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report.bytes_out == sum(t.numel() * t.element_size() for t in disk_tensors(tmp_path / "bf").values())
