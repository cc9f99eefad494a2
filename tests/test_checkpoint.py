"""Checkpoints: sharded and FP8 directories load; broken ones fail naming file and tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint.hf import CheckpointError, save_pretrained
from nanoseek.model import CausalLM
from nanoseek.quant.fp8 import quantize_weight
from tests.conftest import randomize, tiny_config, v2_config


@pytest.fixture
def model():
    return randomize(CausalLM(tiny_config())).eval()


@pytest.fixture
def ckpt(tmp_path, model):
    save_pretrained(model, tmp_path)
    return tmp_path


def logits(m, seed=1):
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(ids)


def test_sharded_checkpoint_round_trips(tmp_path, model):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    assert "model.layers.2.eh_proj.weight" in index["weight_map"]  # MTP as layer L + k
    assert "model.layers.2.shared_head.head.weight" in index["weight_map"]
    torch.testing.assert_close(logits(nanoseek.from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


def test_fp8_block_quantised_checkpoint_is_dequantised_on_load(ckpt, model):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    quantised = 0
    for name in list(tensors):
        if name.endswith("proj.weight") and "layernorm" not in name:
            q, scale_inv = quantize_weight(tensors[name])
            tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
            quantised += 1
    save_file(tensors, path)
    assert quantised > 10
    loaded = nanoseek.from_pretrained(ckpt)
    w = loaded.model.layers[0].self_attn.kv_b_proj.weight
    ref = model.model.layers[0].self_attn.kv_b_proj.weight
    assert w.dtype == torch.float32 and not torch.equal(w, ref)
    assert (w - ref).abs().max() <= ref.abs().max() / 16  # E4M3 keeps ~3 mantissa bits
    from nanoseek.quant.fp8 import dequantize_weight
    q = load_file(ckpt / "model.safetensors")
    exact = dequantize_weight(q["model.layers.0.self_attn.kv_b_proj.weight"],
                              q["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"])
    assert torch.equal(w, exact)
    a, b = logits(loaded), logits(model)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95


def _rewrite(ckpt, fn):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*missing"):
        nanoseek.from_pretrained(ckpt)


def test_wrong_shape_names_file_and_tensor(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    _rewrite(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*o_proj\.weight.*shape \(3, 3\)"):
        nanoseek.from_pretrained(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_named(ckpt, bad):
    def poison(t):
        t["model.layers.1.self_attn.kv_b_proj.weight"][3, 5] = bad
    _rewrite(ckpt, poison)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*kv_b_proj\.weight.*1 non-finite"):
        nanoseek.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    def add(t):
        t["model.layers.0.self_attn.rotary_bonus"] = torch.zeros(2)
    _rewrite(ckpt, add)
    with pytest.raises(CheckpointError, match="rotary_bonus"):
        nanoseek.from_pretrained(ckpt)


@pytest.mark.parametrize("numel", [0, 2])
def test_empty_tensor_of_an_absent_module_is_skipped_but_not_a_full_one(tmp_path, numel):
    """transformers writes [0, D] shared-expert weights for n_shared_experts 0: nothing to load.
    A tensor with numbers in it that the model has no place for is still an error."""
    model = randomize(CausalLM(tiny_config(n_shared_experts=0))).eval()
    save_pretrained(model, tmp_path)
    name = "model.layers.1.mlp.shared_experts.up_proj.weight"
    assert load_file(tmp_path / "model.safetensors")[name].shape == (0, 32)  # written as transformers does

    def resize(t):
        t[name] = torch.zeros(numel, 32)
    _rewrite(tmp_path, resize)
    if numel:
        with pytest.raises(CheckpointError, match=r"unexpected tensor .*shared_experts\.up_proj"):
            nanoseek.from_pretrained(tmp_path)
    else:
        torch.testing.assert_close(logits(nanoseek.from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


def test_v2_checkpoint_is_written_as_v2(tmp_path):
    """Softmax routing has no DeepseekV3 form: config.json says DeepseekV2 and keeps the V2
    routing fields, and no e_score_correction_bias is written."""
    model = randomize(CausalLM(v2_config())).eval()
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"] and cfg["model_type"] == "deepseek_v2"
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["n_group"], cfg["topk_group"]) == (
        "group_limited_greedy", "softmax", 4, 2)
    assert cfg["norm_topk_prob"] is False and cfg["q_lora_rank"] is None
    assert not any("e_score_correction_bias" in n for n in load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(nanoseek.from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


def test_unknown_architecture_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        nanoseek.from_pretrained(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file_is_named(ckpt, keep):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        nanoseek.from_pretrained(ckpt)


def test_index_pointing_at_a_missing_shard_is_named(tmp_path, model):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        nanoseek.from_pretrained(tmp_path)


def test_fp8_weight_without_scale_is_named(ckpt):
    def drop_scale(t):
        q, _ = quantize_weight(t["model.layers.0.self_attn.o_proj.weight"])
        t["model.layers.0.self_attn.o_proj.weight"] = q
    _rewrite(ckpt, drop_scale)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv"):
        nanoseek.from_pretrained(ckpt)


def test_no_config_or_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        nanoseek.from_pretrained(tmp_path)
    preset_cfg = tiny_config()
    preset_cfg.to_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        nanoseek.from_pretrained(tmp_path)


def test_save_leaves_no_temporary_files_and_readable_permissions(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert (ckpt / "model.safetensors").stat().st_mode & 0o044  # group/other may read


def test_bf16_save_keeps_router_in_fp32(tmp_path, model):
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    t = load_file(tmp_path / "model.safetensors")
    assert t["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    loaded = nanoseek.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    out = logits(loaded)  # runs in bf16 with an fp32 router
    assert torch.isfinite(out).all()
