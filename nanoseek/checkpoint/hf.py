"""Hugging Face-format checkpoints, both directions.

A checkpoint is a directory with `config.json` and one or several `*.safetensors` files
(sharded ones listed in `model.safetensors.index.json`). Names are the DeepseekV3 layout;
MTP module k is stored as `model.layers.{num_hidden_layers + k}`, with copies of the
shared `embed_tokens` and `shared_head.head` beside it as in DeepSeek's release (vLLM and
SGLang read them there). FP8 weights (float8_e4m3fn, or float8_e5m2 with the same
128x128 block scales) with `weight_scale_inv` are dequantised on load, or kept as FP8 in
FP8Linear modules with quantization="fp8"; any other dtype beside a scale is refused.

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

from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.quant.fp8 import FP8, FP8_DTYPES, dequantize_weight, quantize_weight
from nanoseek.quant.model import check_quantization, quantize_model_fp8

ARCHITECTURES = {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "NanoseekForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of shared tensors
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing something, has a wrong shape, or cannot be read."""


# ------------------------------------------------------------------------ names
def to_hf_name(name: str, cfg: ModelConfig) -> str:
    m = _MTP.match(name)
    return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}" if m else name


def from_hf_name(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint name -> state-dict name; None for copies of shared tensors."""
    m = _LAYER.match(name)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        if m[2] in MTP_SHARED:
            return None
        return f"mtp.{int(m[1]) - cfg.num_hidden_layers}.{m[2]}"
    return name


# ------------------------------------------------------------------------- save
def hf_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names, contiguous and unshared."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not _keep_fp32(name) and not _is_fp8_part(name, t):
            t = t.to(dtype)
        out[to_hf_name(name, cfg)] = t.contiguous().clone()
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
                key = to_hf_name(f"{name}.shared_experts.{proj}.weight", model.config)
                out[key] = torch.empty(shape, dtype=dtype)
    return out


def _is_fp8_part(name: str, t: torch.Tensor) -> bool:
    """An FP8Linear's codes or block scales: saved as they are, whatever `dtype` says."""
    return t.dtype in FP8_DTYPES or name.endswith("_scale_inv")


def _keep_fp32(name: str) -> bool:
    """The router stays in fp32 (as transformers keeps it), whatever the weights' dtype."""
    return name.endswith("gate.weight") and ".mlp.gate." in name or name.endswith("e_score_correction_bias")


def save_pretrained(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors shards (with an index when there are several):
    `model` is a CausalLM (its `.config`, its state dict under nanoseek's names)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype)
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
    atomic_write_text(path / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")


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
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown architecture {unknown[0]!r}; nanoseek loads "
                              f"{sorted(ARCHITECTURES)}")
    try:
        return ModelConfig.from_dict(raw, source=str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


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


def read_tensors(path: Path, weight_map: dict[str, str], keep_fp8=None):
    """Yield (checkpoint name, tensor, file) with FP8 weights dequantised to fp32, except the
    E4M3 weights `keep_fp8(name)` selects: those come as stored, each followed by its
    `<name>_scale_inv` (a model with FP8Linear modules takes both as they are)."""
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in sorted(by_file.items()):
        f = _open(path / fname)
        for name in sorted(names):
            if name.endswith("_scale_inv"):
                continue
            t = _get(f, path / fname, name)
            if t.dtype in FP8_DTYPES or name + "_scale_inv" in weight_map:
                scale, scale_file = _scale_of(path, fname, f, name, t, weight_map)
                if t.dtype == FP8 and keep_fp8 is not None and keep_fp8(name):
                    yield name, t, path / fname
                    yield name + "_scale_inv", scale, scale_file
                    continue
                try:
                    t = dequantize_weight(t, scale)
                except ValueError as e:
                    raise CheckpointError(f"{scale_file}: tensor {name + '_scale_inv'!r}: {e}") from None
            yield name, t, path / fname


def _scale_of(path: Path, fname: str, f, name: str, t: torch.Tensor,
              weight_map: dict[str, str]) -> tuple[torch.Tensor, Path]:
    """A block-quantised weight's `_scale_inv` and its file. Codes of any dtype but the FP8
    ones are refused: read as numbers they would be silently wrong (transformers, for one,
    reads int8 beside a scale as packed FP4)."""
    scale_name = name + "_scale_inv"
    if t.dtype not in FP8_DTYPES:
        raise CheckpointError(f"{path / fname}: tensor {name!r} has dtype {t.dtype} beside "
                              f"{scale_name!r}; nanoseek dequantises block-scaled "
                              f"{' and '.join(str(d) for d in FP8_DTYPES)} only")
    if scale_name not in weight_map:
        raise CheckpointError(f"{path / fname}: tensor {name!r} is FP8 ({t.dtype}) but "
                              f"{scale_name!r} is missing")
    scale_file = path / weight_map[scale_name]
    scale = _get(f if scale_file == path / fname else _open(scale_file), scale_file, scale_name)
    if not scale.is_floating_point():  # e.g. uint8 E8M0 exponents: not nanoseek's format
        raise CheckpointError(f"{scale_file}: tensor {scale_name!r} has dtype {scale.dtype}; "
                              "expected floating-point block scales")
    return scale.float(), scale_file


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
    weight_map = checkpoint_files(path)
    cfg = _drop_absent_mtp(cfg, weight_map, path)
    with torch.device("meta"):
        model = cls(cfg)
    if quantization == "fp8":
        quantize_model_fp8(model)  # on meta: the structure only
    expected = {n: p for n, p in model.state_dict().items()}

    def wants_fp8(name: str) -> bool:
        ref = expected.get(from_hf_name(name, cfg) or "")
        return ref is not None and ref.dtype == FP8

    loaded: dict[str, torch.Tensor] = {}
    for name, t, file in read_tensors(path, weight_map, keep_fp8=wants_fp8):
        key = from_hf_name(name, cfg)
        if key is None:
            continue
        if key not in expected:
            if t.numel() == 0:  # transformers' empty shared experts when n_shared_experts is 0
                continue
            raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a model with "
                                  f"this config.json)")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                  f"{tuple(expected[key].shape)} from config.json")
        _check_finite(t, name, file)
        loaded.update(_placed(key, t, expected[key].dtype, dtype, device or "cpu"))
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{path}: tensor {to_hf_name(missing[0], cfg)!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(loaded, assign=True, strict=True)
    model.materialise_buffers(device)
    return model.eval()


def _placed(key: str, t: torch.Tensor, model_dtype: torch.dtype, dtype: torch.dtype | None,
            device) -> dict[str, torch.Tensor]:
    """The tensor(s) a checkpoint tensor becomes in the model: FP8 codes and block scales
    as stored (a high-precision weight an FP8Linear wants is quantised here), the router
    in fp32, everything else in `dtype` (default: the model's)."""
    if model_dtype == FP8 and t.dtype != FP8:
        q, s = quantize_weight(t)
        return {key: q.to(device), key + "_scale_inv": s.to(device)}
    if model_dtype == FP8 or key.endswith("_scale_inv"):
        return {key: t.to(device=device, dtype=model_dtype)}
    want = torch.float32 if _keep_fp32(key) else (dtype or model_dtype)
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
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    if any(n.startswith(prefix) for n in weight_map):
        return cfg
    warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but "
                  "the checkpoint has no MTP weights; loading without MTP", stacklevel=3)
    return cfg.replace(num_nextn_predict_layers=0)

