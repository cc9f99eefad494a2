"""FP8 checkpoints mean the same thing everywhere: which dtypes nanoseek dequantises (and
which it refuses), partial 128x128 blocks, what `convert` copies, what `--dequant` gives in
bf16 and fp32, and which shapes transformers' block dequantisation reads correctly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint.hf import CheckpointError, checkpoint_files, read_tensors
from nanoseek.model import CausalLM
from nanoseek.checkpoint.convert import SIDE_FILES, convert
from nanoseek.text.tokenizer import TOKENIZER_FILES
from tests.conftest import randomize, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture
def ckpt(tmp_path):
    nanoseek.save_pretrained(randomize(CausalLM(tiny_config())).eval(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _replace(ckpt, name, codes, scale):
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name], tensors[name + "_scale_inv"] = codes, scale
    save_file(tensors, ckpt / "model.safetensors")


def _by_hand(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """code x scale of its 128x128 block, the last blocks partial: an independent spelling."""
    M, N = codes.shape
    per_elem = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:M, :N]
    return codes.float() * per_elem


def test_e5m2_weights_are_dequantised_with_the_same_block_scales(ckpt):
    w = load_file(ckpt / "model.safetensors")[NAME].float()
    scale = w.abs().max().reshape(1, 1) / torch.finfo(torch.float8_e5m2).max
    codes = (w / scale).to(torch.float8_e5m2)
    _replace(ckpt, NAME, codes, scale)
    got = nanoseek.from_pretrained(ckpt).state_dict()["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(got, _by_hand(codes, scale))
    assert (got - w).abs().max() < 0.2 * w.abs().max()  # e5m2: 2 mantissa bits, but close


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bfloat16, torch.float32])
def test_other_dtypes_beside_a_scale_are_refused_by_name_and_dtype(ckpt, dtype):
    w = load_file(ckpt / "model.safetensors")[NAME]
    _replace(ckpt, NAME, (w * 100).to(dtype), torch.ones(1, 1))
    with pytest.raises(CheckpointError, match=rf"o_proj\.weight.*{dtype}".replace("torch.", "")):
        nanoseek.from_pretrained(ckpt)


def test_integer_scales_are_refused(ckpt):
    """uint8 scales are E8M0 exponents to transformers; read as numbers they would be wrong."""
    w = load_file(ckpt / "model.safetensors")[NAME]
    _replace(ckpt, NAME, w.to(torch.float8_e4m3fn), torch.full((1, 1), 127, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv.*uint8"):
        nanoseek.from_pretrained(ckpt)


def test_partial_blocks_round_trip_through_fp8_write_and_load(tmp_path):
    """Dims over 128 that are not multiples of it (200, 300): the last block is partial and
    its scale covers only the rows/columns that exist."""
    cfg = tiny_config(hidden_size=200, intermediate_size=300, num_nextn_predict_layers=0)
    nanoseek.save_pretrained(randomize(CausalLM(cfg), std=0.05).eval(), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "fp8", "fp8", dtype="fp32", progress=False)
    raw = {}
    for f in (tmp_path / "fp8").glob("*.safetensors"):
        raw.update(load_file(f))
    loaded = nanoseek.from_pretrained(tmp_path / "fp8").state_dict()
    shapes = set()
    for name, codes in raw.items():
        if codes.dtype != torch.float8_e4m3fn:
            continue
        scale = raw[name + "_scale_inv"]
        M, N = codes.shape
        assert scale.shape == (-(-M // 128), -(-N // 128)), name
        assert torch.equal(loaded[name], _by_hand(codes, scale)), name
        shapes.add((M, N))
    assert (300, 200) in shapes and (200, 300) in shapes  # gate/up and down of the dense FFN


def test_transformers_block_dequantisation_reads_only_these_shapes():
    """Pins the README's statement on transformers' CPU/dequantize path, which derives the
    block as rows // scale_rows: right when every dim is <= 128 or a multiple of 128."""
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "Fp8Dequantize"):
        pytest.skip("this transformers has no Fp8Dequantize")
    from nanoseek.quant.fp8 import quantize_weight
    theirs = fp8.Fp8Dequantize(None)._dequantize_one
    for shape, ok in [((96, 100), True), ((256, 384), True), ((384, 72), True),
                      ((200, 64), False), ((64, 300), False)]:
        q, s = quantize_weight(torch.randn(shape))
        assert torch.equal(theirs(q, s, torch.float32), _by_hand(q, s)) == ok, shape
    for shape in [(260, 64), (576, 256)]:  # 3 or 5 scale rows do not divide; 576: V3's kv_a_proj
        q, s = quantize_weight(torch.randn(shape))
        with pytest.raises(ValueError):
            theirs(q, s, torch.float32)


def test_fp8_checkpoint_gives_transformers_the_same_logits(tmp_path):
    """transformers loads FP8 through accelerate (a dev dependency): same logits."""
    import transformers
    model = randomize(CausalLM(tiny_config(num_nextn_predict_layers=0, hidden_size=256,
                                           intermediate_size=384)), std=0.05).eval()
    nanoseek.save_pretrained(model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "fp8", "fp8", dtype="fp32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        assert (hf(ids).logits - nanoseek.from_pretrained(tmp_path / "fp8")(ids)).abs().max() <= 1e-4


def test_convert_copies_the_checkpoint_not_the_run_directory(ckpt, tmp_path):
    side = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "chat_template.jinja", "modeling_deepseek.py"]
    junk = ["train_state.pt", "report.md", "loss.png", "notes.txt", "run.log"]
    for name in side + junk:
        (ckpt / name).write_text(name)
    (ckpt / "additional_chat_templates").mkdir()
    (ckpt / "additional_chat_templates" / "tool_use.jinja").write_text("{{ x }}")
    (ckpt / "plots").mkdir()
    (ckpt / "plots" / "a.png").write_text("png")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    convert(ckpt, tmp_path / "fp8", "fp8", progress=False)
    got = {str(p.relative_to(tmp_path / "fp8")) for p in (tmp_path / "fp8").rglob("*") if p.is_file()}
    assert got == {"config.json", "model.safetensors", "additional_chat_templates/tool_use.jinja", *side}
    assert (tmp_path / "fp8" / "chat_template.jinja").read_text() == "chat_template.jinja"
    assert set(TOKENIZER_FILES) <= SIDE_FILES  # what `nanoseek tokenizer train` writes travels


def test_dequant_is_exact_in_fp32_and_rounded_once_more_in_bf16(ckpt, tmp_path):
    convert(ckpt, tmp_path / "fp8", "fp8", progress=False)
    for dtype in ("fp32", "bf16"):
        convert(tmp_path / "fp8", tmp_path / dtype, "dequant", dtype=dtype, progress=False)
    decoded = {n: t for n, t, _ in read_tensors(tmp_path / "fp8", checkpoint_files(tmp_path / "fp8"))}
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    quantised = [n for n, t in load_file(tmp_path / "fp8" / "model.safetensors").items()
                 if t.dtype == torch.float8_e4m3fn]
    assert all(torch.equal(fp32[n], decoded[n]) for n in quantised)
    assert all(torch.equal(bf16[n], decoded[n].bfloat16()) for n in quantised)
    changed = sum((bf16[n].float() != decoded[n]).sum().item() for n in quantised)
    assert changed > 0.5 * sum(decoded[n].numel() for n in quantised)  # code x fp32 scale: > 8 bits
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = nanoseek.from_pretrained(tmp_path / "fp8")(ids)
        assert torch.equal(nanoseek.from_pretrained(tmp_path / "fp32")(ids), ref)
    as_bf16 = nanoseek.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).state_dict()
    from_bf16 = nanoseek.from_pretrained(tmp_path / "bf16").state_dict()
    assert all(torch.equal(v, from_bf16[k]) for k, v in as_bf16.items())
