"""Hugging Face-format checkpoints, both directions.

A checkpoint is a directory with `config.json` and one or several `*.safetensors` files
(sharded ones listed in `model.safetensors.index.json`). Names are the DeepseekV3 layout
(V3.2 adds the indexer's); MTP module k is stored as `model.layers.{num_hidden_layers + k}`,
with copies of the shared `embed_tokens` and `shared_head.head` beside it as in DeepSeek's
release (vLLM and SGLang read them there). V4's names, in DeepSeek's and transformers'
spellings, are in names.py.

Quantised weights are dequantised on load, exactly:
  - FP8 (float8_e4m3fn, or float8_e5m2 with the same 128x128 block scales) beside
    `weight_scale_inv` (V3, V3.2: FP32 scales, powers of two under scale_fmt "ue8m0"), or
    kept as FP8 in FP8Linear modules with quantization="fp8";
  - V4's `<name>.scale` beside `<name>.weight`: FP8 E4M3 with one UE8M0 (float8_e8m0fnu) or
    FP32 scale per 128x128 block, and the routed experts' packed FP4 E2M1 (int8 or
    float4_e2m1fn_x2, two per byte) with one UE8M0 scale per 32 inputs (quant/fp4.py).
Any other dtype or scale layout is refused in one line naming the tensor and its format, and
so is a `quantization_config` that promises another format. A model holding FP8Linear weights
is saved in V3's layout with V3's `quantization_config` (V4 refuses: its release layout is
another, which nanoseek does not write). `save_pretrained(..., fp4_experts=True)` writes the
routed experts as V4-Flash stores them (packed E2M1 + UE8M0 `.scale` per 32 inputs, for V3
and V4 models alike; the other tensors in `dtype`), with `FP4_EXPERTS_CONFIG`.

Every failure names the file and the tensor, and every file is written atomically.

The model class is handed in (`CausalLM.from_pretrained` calls `load_pretrained(cls, ...)`;
`save_pretrained` takes the model): this module imports nothing of nanoseek.model, so the
model may import it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nanoseek.checkpoint import names
from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.quant.fp4 import FP4_X2, PACKED_DTYPES, dequantize_fp4, quantize_fp4
from nanoseek.quant.fp4_qat import ROUTED_EXPERT
from nanoseek.quant.fp8 import FP8, FP8_DTYPES, dequantize_weight, quantize_weight
from nanoseek.quant.model import check_quantization, quantize_model_fp8

ARCHITECTURES = {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "NanoseekForCausalLM",
                 "DeepseekV32ForCausalLM", "DeepseekV4ForCausalLM"}
# Vision-language checkpoints: their language model is nanoseek's, the whole is built by
# nanoseek/model/vl/ (nanoseek.from_pretrained picks it by this name).
VISION_ARCHITECTURES = {"DeepseekVLForConditionalGeneration": "deepseek_vl",
                        "DeepseekOcr2ForConditionalGeneration": "deepseek_ocr2"}
INDEX_FILE = "model.safetensors.index.json"
# What a config.json's quantization_config may say: DeepSeek's FP8 blocks (V3, V3.2, V4) and
# V4's FP4 experts. Any other value is a format nanoseek does not read. scale_fmt "float" is
# what transformers' FineGrainedFP8Config writes by default: FP32 scales, V3's.
QUANT_CONFIG = {"quant_method": ("fp8",), "fmt": ("e4m3",), "activation_scheme": ("dynamic",),
                "weight_block_size": ([128, 128],), "scale_fmt": (None, "ue8m0", "float"),
                "expert_dtype": (None, "fp4", "fp8"), "scale_dtype": (None, "fp32", "fp8")}
# What DeepSeek-V3's config.json says of its FP8 weights; written with every FP8 checkpoint.
V3_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]}
# What a checkpoint whose routed experts alone are FP4 says: V4-Flash's quantization_config
# (expert_dtype "fp4": transformers' FineGrainedFP8Config reads the experts' packed codes and
# `.scale`s), with every other module kept out of its FP8 conversion (a regex of module
# names: all but the routed experts), since those weights are stored in high precision.
FP4_EXPERTS_CONFIG = {**V3_QUANTIZATION_CONFIG, "scale_fmt": "ue8m0", "expert_dtype": "fp4",
                      "modules_to_not_convert": [r"(?!.*\.mlp\.experts$).*"]}


class CheckpointError(RuntimeError):
    """A checkpoint is missing something, has a wrong shape, or cannot be read."""


# ------------------------------------------------------------------------- save
def hf_state_dict(model: nn.Module, dtype: torch.dtype | None = None,
                  fp4_experts: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names, contiguous and unshared; with
    `fp4_experts` the routed experts' weights as packed FP4 codes beside their `.scale`."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        try:
            disk = names.to_disk(name, cfg)
        except names.UnknownTensor as e:
            raise CheckpointError(str(e)) from None
        if fp4_experts and is_routed_expert_weight(name):
            out[disk], out[disk.removesuffix("weight") + "scale"] = quantize_fp4(t.float())
            continue
        if dtype is not None and t.is_floating_point() and not keep_fp32(name) and not _is_fp8_part(name, t):
            t = t.to(dtype)
        out[disk] = t.contiguous().clone()
    if cfg.is_v4:  # DeepSeek's V4 MTP block shares embed and head: no copies in its release
        return out
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[prefix + "shared_head.head.weight"] = out["lm_head.weight"].clone()
    out.update(_empty_shared_experts(model, dtype or model.lm_head.weight.dtype))
    return out


def _empty_shared_experts(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """With n_shared_experts 0, transformers (whose config takes no null) still builds a
    shared-expert MLP of width 0 and reports its weights MISSING unless the checkpoint has
    them: write them as it does, empty. Loading skips them again."""
    D, out = model.config.hidden_size, {}
    moe = {id(m) for m in model.moe_layers()}
    for name, m in model.named_modules():
        if id(m) in moe and m.shared_experts is None:
            for proj, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
                key = names.to_disk(f"{name}.shared_experts.{proj}.weight", model.config)
                out[key] = torch.empty(shape, dtype=dtype)
    return out


def is_routed_expert_weight(name: str) -> bool:
    """A routed expert's gate/up/down weight, by its state-dict name (main layers and MTP)."""
    return name.endswith(".weight") and ROUTED_EXPERT.search(name.removesuffix(".weight")) is not None


def _is_fp8_part(name: str, t: torch.Tensor) -> bool:
    """An FP8Linear's codes or block scales: saved as they are, whatever `dtype` says."""
    return t.dtype in FP8_DTYPES or name.endswith("_scale_inv")


# V4 tensors DeepSeek's release and transformers keep in fp32: the mHC mixing weights, the
# attention sinks and the compressors' positional biases.
_V4_FP32 = re.compile(r"(\.(attn_hc|ffn_hc)\.|hc_head\.|\.sinks$|\.position_bias$)")


def keep_fp32(name: str) -> bool:
    """The router stays in fp32 (as transformers keeps it), whatever the weights' dtype, and
    so do V4's mHC weights, sinks and compressor position biases. `name` is a state-dict
    name (names.from_disk gives it for any checkpoint spelling)."""
    return (name.endswith("gate.weight") and ".mlp.gate." in name or name.endswith("e_score_correction_bias")
            or _V4_FP32.search(name) is not None)


def save_pretrained(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 << 30, fp4_experts: bool = False) -> None:
    """Write config.json and safetensors shards (with an index when there are several):
    `model` is a CausalLM (its `.config`, its state dict under nanoseek's names). FP8Linear
    weights are written as DeepSeek-V3 stores them (E4M3 codes + `weight_scale_inv`) with
    V3's quantization_config, without which other loaders would read the codes as values.
    fp4_experts: the routed experts in V4-Flash's FP4 layout (quant/fp4.py), from the fp32
    weights (the masters of an FP4-QAT model), which loads as that model fake-quantised."""
    path = Path(path)
    fp8 = _holds_fp8(model, path)
    if fp4_experts and fp8:
        raise CheckpointError(f"{path}: fp4_experts with FP8 weights in the model: load it without "
                              "quantization to write its experts in FP4")
    tensors = hf_state_dict(model, dtype, fp4_experts)
    if fp4_experts and not any(t.dtype in PACKED_DTYPES for t in tensors.values()):
        raise CheckpointError(f"{path}: fp4_experts: the model has no routed experts to write in FP4")
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        atomic_write(path / fname, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
    index = path / INDEX_FILE
    if len(shards) > 1:
        weight_map = {n: f for f, s in zip(names, shards) for n in s}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total},
                                             "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    cfg_dict = model.config.to_dict()
    if dtype is not None:
        cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        cfg_dict["quantization_config"] = dict(V3_QUANTIZATION_CONFIG)
    if fp4_experts:
        cfg_dict["quantization_config"] = dict(FP4_EXPERTS_CONFIG)
    atomic_write_text(path / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")


def _holds_fp8(model: nn.Module, path: Path) -> bool:
    """Whether the model has FP8 weights to save; a V4 model with them is refused: DeepSeek's
    V4 release stores FP8 beside UE8M0 `.scale`s and its routed experts in FP4, a layout
    nanoseek reads but does not write, and V3's layout under V4's names is no release's."""
    fp8 = any(t.dtype in FP8_DTYPES for t in model.state_dict().values())
    if fp8 and model.config.is_v4:
        raise CheckpointError(f"{path}: cannot save a DeepSeek-V4 model with FP8 weights (quantization="
                              "'fp8'): nanoseek writes FP8 in DeepSeek-V3's layout only; load the "
                              "model without quantization to save it in bf16 or fp32")
    return fp8


# ------------------------------------------------------------------------- load
def read_config(path: Path) -> ModelConfig:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    archs = raw.get("architectures") or ["DeepseekV3ForCausalLM"]
    if vision_architecture(raw):
        raise CheckpointError(f"{cfg_path}: a vision-language checkpoint ({vision_architecture(raw)}); "
                              "load it with nanoseek.from_pretrained (nanoseek/model/vl/)")
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown architecture {unknown[0]!r}; nanoseek loads "
                              f"{sorted(ARCHITECTURES)}")
    check_quantization_config(raw, cfg_path)
    try:
        return ModelConfig.from_dict(raw, source=str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def vision_architecture(raw: dict) -> str | None:
    """The vision-language class a config.json dict names (by architectures or model_type), or None."""
    for arch, model_type in VISION_ARCHITECTURES.items():
        if arch in (raw.get("architectures") or []) or raw.get("model_type") == model_type:
            return arch
    return None


def vision_checkpoint(path: str | os.PathLike) -> str | None:
    """The vision-language architecture a checkpoint directory's config.json names, or None
    (a text model, or no readable config.json): a JSON read, so callers import the vision
    models, and transformers' towers with them, only for such a checkpoint."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return vision_architecture(raw) if isinstance(raw, dict) else None


def check_quantization_config(raw: dict, cfg_path: Path) -> None:
    """Refuse, in one line, a quantization_config (or V4's top-level expert_dtype) that names
    a format nanoseek does not dequantise. The tensors' dtypes and scales are checked again
    as they are read: the config only says what to expect."""
    qc = quantization(raw, cfg_path)
    for key, value in qc.items():
        if key in QUANT_CONFIG and value not in QUANT_CONFIG[key]:
            raise CheckpointError(f"{cfg_path}: quantization_config.{key} = {value!r}: nanoseek reads "
                                  "DeepSeek's FP8 (e4m3, 128x128 blocks, fp32 or ue8m0 scales, dynamic "
                                  "activations) and V4's FP4 experts only")


def quantization(raw: dict, cfg_path: Path) -> dict:
    """config.json's quantization_config, with V4's top-level expert_dtype folded in (as
    transformers does); a quantization_config that is not a JSON object is refused."""
    qc = raw.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: quantization_config = {qc!r}: expected a JSON object "
                              '(e.g. {"quant_method": "fp8", ...})')
    qc = dict(qc)
    if raw.get("expert_dtype") is not None:
        qc.setdefault("expert_dtype", raw["expert_dtype"])
    return qc


def checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or by opening every *.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for fname in set(weight_map.values()):
            if not (path / fname).exists():
                name = next(n for n, f in weight_map.items() if f == fname)
                raise CheckpointError(f"{path / fname}: listed in {INDEX_FILE} (e.g. for tensor "
                                      f"{name!r}) but the file does not exist")
        return weight_map
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    weight_map = {}
    for fname in files:
        for name in _open(path / fname).keys():
            weight_map[name] = fname
    return weight_map


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot be read as safetensors, truncated or corrupt? ({e})") from None


def scale_name(name: str, weight_map: dict[str, str]) -> str | None:
    """The scale stored beside a quantised weight: `<name>_scale_inv` (DeepSeek-V3, V3.2) or,
    for `<x>.weight`, `<x>.scale` (DeepSeek-V4); None if neither is there."""
    if name + "_scale_inv" in weight_map:
        return name + "_scale_inv"
    if name.endswith(".weight") and (v4 := name.removesuffix("weight") + "scale") in weight_map:
        return v4
    return None


def is_scale(name: str, weight_map: dict[str, str]) -> bool:
    """A quantisation scale (read with its weight), not a tensor of the model: V4's
    `hc_attn_scale` and transformers' `attn_hc.scale` have no `.weight` beside them."""
    return name.endswith("_scale_inv") or (name.endswith(".scale")
                                           and name.removesuffix("scale") + "weight" in weight_map)


def read_tensors(path: Path, weight_map: dict[str, str], keep_fp8=None):
    """Yield (checkpoint name, tensor, file) with quantised weights dequantised to fp32, except
    the E4M3 weights `keep_fp8(name)` selects: those come as stored, each followed by its
    scales as FP32 under `<name>_scale_inv` (a model with FP8Linear modules takes both)."""
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names_ in sorted(by_file.items()):
        f = _open(path / fname)
        for name in sorted(names_):
            if is_scale(name, weight_map):
                continue
            t = _get(f, path / fname, name)
            if t.dtype in FP8_DTYPES or t.dtype == FP4_X2 or scale_name(name, weight_map) is not None:
                scale, scale_file, sname = _scale_of(path, fname, f, name, t, weight_map)
                if t.dtype == FP8 and keep_fp8 is not None and keep_fp8(name):
                    yield name, t, path / fname
                    yield name + "_scale_inv", scale.float(), scale_file
                    continue
                try:
                    t = (dequantize_fp4(t, scale) if t.dtype in PACKED_DTYPES else
                         dequantize_weight(t, scale, scale_name="scale" if sname.endswith(".scale") else "scale_inv"))
                except ValueError as e:
                    raise CheckpointError(f"{scale_file}: tensor {sname!r}: {e}") from None
            yield name, t, path / fname


def _scale_of(path: Path, fname: str, f, name: str, t: torch.Tensor,
              weight_map: dict[str, str]) -> tuple[torch.Tensor, Path, str]:
    """A quantised weight's scales, their file and name. FP8 codes take `_scale_inv` or
    V4's `.scale`; packed FP4 codes (int8, float4_e2m1fn_x2) only V4's `.scale`. Codes of
    any other dtype are refused: read as numbers they would be silently wrong (transformers,
    for one, reads int8 beside any scale as packed FP4)."""
    sname = scale_name(name, weight_map)
    if sname is None:
        v4 = f" or {name.removesuffix('weight') + 'scale'!r}" if name.endswith(".weight") else ""
        raise CheckpointError(f"{path / fname}: tensor {name!r} is quantised ({t.dtype}) but its "
                              f"scales are missing ({name + '_scale_inv'!r}{v4})")
    fp4 = t.dtype in PACKED_DTYPES and sname.endswith(".scale")
    if t.dtype not in FP8_DTYPES and not fp4:
        raise CheckpointError(f"{path / fname}: tensor {name!r} has dtype {t.dtype} beside "
                              f"{sname!r}; nanoseek dequantises block-scaled "
                              f"{' and '.join(str(d) for d in FP8_DTYPES)}, and packed FP4 "
                              "(int8 or float4_e2m1fn_x2) beside a V4 `.scale`, only")
    scale_file = path / weight_map[sname]
    scale = _get(f if scale_file == path / fname else _open(scale_file), scale_file, sname)
    if not scale.is_floating_point():  # e.g. uint8 E8M0 exponents: not nanoseek's format
        raise CheckpointError(f"{scale_file}: tensor {sname!r} has dtype {scale.dtype}; "
                              "expected floating-point block scales (float32 or float8_e8m0fnu)")
    return scale, scale_file, sname


def _get(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: tensor {name!r} cannot be read, truncated file? ({e})") from None


def load_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, quantization: str | None = None):
    """A `cls` (CausalLM) from a checkpoint directory (nanoseek-, transformers- or DeepSeek-written).
    quantization="fp8": the projection Linears become FP8Linear modules (nanoseek/quant/
    model.py); an FP8 checkpoint's codes and scales are kept as stored, high-precision
    weights are quantised as they are read. Without it FP8 weights are dequantised."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    check_quantization(quantization)
    cfg = read_config(path)
    fp4 = _declares_fp4(path)
    weight_map = checkpoint_files(path)
    cfg = _drop_absent_mtp(cfg, weight_map, path)
    with torch.device("meta"):
        model = cls(cfg)
    if quantization == "fp8":
        quantize_model_fp8(model)  # on meta: the structure only
    expected = {n: p for n, p in model.state_dict().items()}

    def wants_fp8(name: str) -> bool:
        ref = expected.get(names.from_disk(name, cfg) or "")
        return ref is not None and ref.dtype == FP8

    loaded: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # state-dict name -> the checkpoint tensor it came from
    for name, t, file in read_tensors(path, weight_map, keep_fp8=wants_fp8):
        for key, part in names.from_disk_tensors(name, t, cfg):
            if key not in expected:
                if part.numel() == 0:  # transformers' empty shared experts when n_shared_experts is 0
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a model with "
                                      f"this config.json)")
            if key in source:
                raise CheckpointError(f"{file}: tensor {name!r} gives {key!r}, which "
                                      f"{source[key]!r} already gave (two spellings of one tensor)")
            if expected[key].is_floating_point() and not part.is_floating_point():
                raise CheckpointError(_unscaled_codes(file, name, part, expected[key], fp4))
            if tuple(part.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(part.shape)}, expected "
                                      f"{tuple(expected[key].shape)} from config.json")
            _check_finite(part, name, file)
            source[key] = name
            loaded.update(_placed(key, part, expected[key].dtype, dtype, device or "cpu"))
    missing = sorted(set(expected) - set(loaded))
    if missing:
        spelling = names.spelling(weight_map, cfg)
        raise CheckpointError(f"{path}: tensor {names.to_disk(missing[0], cfg, spelling)!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(loaded, assign=True, strict=True)
    model.materialise_buffers(device)
    return model.eval()


def _declares_fp4(path: Path) -> bool:
    """Whether config.json says the routed experts are FP4 (V4-Flash's expert_dtype)."""
    raw = json.loads((path / "config.json").read_text())
    return quantization(raw, path / "config.json").get("expert_dtype") == "fp4"


def _unscaled_codes(file: Path, name: str, t: torch.Tensor, want: torch.Tensor, fp4: bool) -> str:
    """Integer codes where the model has a floating-point weight: packed FP4 whose `.scale`
    is missing when config.json says expert_dtype "fp4" or the int8 rows are half as wide as
    the weight's (two codes per byte); any other integer tensor read as numbers would be wrong."""
    half = t.ndim == 2 and want.ndim == 2 and t.shape[0] == want.shape[0] and 2 * t.shape[1] == want.shape[1]
    if t.dtype in PACKED_DTYPES and (fp4 or half):
        scale = repr(name.removesuffix("weight") + "scale") if name.endswith(".weight") else "its scales"
        why = 'config.json says expert_dtype "fp4"' if fp4 else f"int8 {list(t.shape)} for a {list(want.shape)} weight"
        return f"{file}: tensor {name!r} holds packed FP4 codes ({why}) but {scale} is missing"
    return (f"{file}: tensor {name!r} has dtype {t.dtype} where the model has a {list(want.shape)} "
            "floating-point weight (quantised codes need their scales beside them)")


def _placed(key: str, t: torch.Tensor, model_dtype: torch.dtype, dtype: torch.dtype | None,
            device) -> dict[str, torch.Tensor]:
    """The tensor(s) a checkpoint tensor becomes in the model: FP8 codes and block scales
    as stored (a high-precision weight an FP8Linear wants is quantised here), the router
    in fp32, integer tables (V4's tid2eid) in the model's integer dtype, everything else
    in `dtype` (default: the model's)."""
    if not model_dtype.is_floating_point:
        return {key: t.to(device=device, dtype=model_dtype)}
    if model_dtype == FP8 and t.dtype != FP8:
        q, s = quantize_weight(t)
        return {key: q.to(device), key + "_scale_inv": s.to(device)}
    if model_dtype == FP8 or key.endswith("_scale_inv"):
        return {key: t.to(device=device, dtype=model_dtype)}
    want = torch.float32 if keep_fp32(key) else (dtype or model_dtype)
    return {key: t.to(device=device, dtype=want)}


def _check_finite(t: torch.Tensor, name: str, file: Path) -> None:
    """NaN/Inf weights make every logit NaN (greedy then returns token 0 forever): refuse them."""
    if t.dtype in FP8_DTYPES:  # isfinite has no FP8 kernel; the codes are exact in fp16
        t = t.to(torch.float16)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{file}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf) "
                              f"of {t.numel()}")


def _drop_absent_mtp(cfg: ModelConfig, weight_map: dict[str, str], path: Path) -> ModelConfig:
    """transformers writes num_nextn_predict_layers but never the MTP weights: load such a
    checkpoint without MTP rather than fail. A partial MTP layer is still an error."""
    if cfg.num_nextn_predict_layers == 0:
        return cfg
    if any(names.is_mtp_name(n, cfg) for n in weight_map):
        return cfg
    warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but "
                  "the checkpoint has no MTP weights; loading without MTP", stacklevel=3)
    return cfg.replace(num_nextn_predict_layers=0)

