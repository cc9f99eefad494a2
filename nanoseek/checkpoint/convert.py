"""BF16 <-> FP8 checkpoints in DeepSeek-V3's layout (`nanoseek convert SRC DST --fp8|--dequant`),
and routed experts to V4's FP4 (`--quantization fp4-experts`).

DeepSeek-V3 ships its weights in FP8 (E4M3): every Linear weight of attention and of the
FFNs/experts is stored as `<name>.weight` in FP8 beside `<name>.weight_scale_inv`, one FP32
per 128x128 block, with `quantization_config` in config.json. The embeddings, the output
head, the norms, the router (`mlp.gate.weight`, `e_score_correction_bias`) and the MTP
module's `eh_proj` stay in higher precision, as in the release. DeepSeek-V3.2 adds its
lightning indexer: `indexer.wq_b` and `indexer.wk` in FP8, `indexer.weights_proj` in BF16
(and the LayerNorm `k_norm`). `nanoseek.from_pretrained` dequantises such a checkpoint on
load; transformers, vLLM and SGLang read the same layout.

`--dequant` also reads DeepSeek-V4's release (E4M3 weights beside `<x>.scale` in UE8M0, routed
experts in FP4 E2M1 with one UE8M0 scale per 32 inputs: checkpoint/hf.py dequantises them all).
`--fp8` writes DeepSeek-V3's layout only: a V4 model, whose release uses another one, is
refused. `fp4-experts` writes the routed experts (V3 and V4 models alike, main layers and MTP)
as V4-Flash stores them: packed E2M1 codes (int8, two per byte) beside a UE8M0 `.scale` per 32
inputs (quant/fp4.py), the other tensors in `--dtype`, config.json with hf.FP4_EXPERTS_CONFIG;
what an FP4-QAT model (quant/fp4_qat.py) was trained to be. Whatever `--dtype` says, the tensors the model keeps in FP32 (hf.keep_fp32: the
router and, for V4, the mHC weights, attention sinks and compressor position biases) keep
their stored dtype: FP32 in DeepSeek's releases.

Conversion streams one shard at a time (the output keeps the input's sharding) and writes
every file atomically, config.json last, so an interrupted run never leaves a directory
that looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.checkpoint import names as ckpt_names
from nanoseek.checkpoint.hf import (FP4_EXPERTS_CONFIG, INDEX_FILE, V3_QUANTIZATION_CONFIG, CheckpointError,
                                    checkpoint_files, is_routed_expert_weight, is_scale, keep_fp32,
                                    read_config, read_tensors, scale_name)
from nanoseek.config import ModelConfig
from nanoseek.quant.fp4 import dequantize_fp4, quantize_fp4
from nanoseek.quant.fp8 import dequantize_weight, quant_error, quantize_weight

# attention's and the FFNs' projections, and V3.2's indexer wq_b and wk (stored FP8 by DeepSeek)
QUANTISED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(.*_proj(_with_mqa)?|indexer\.(wq_b|wk))\.weight$")
HIGH_PRECISION = re.compile(r"\.indexer\.weights_proj\.weight$")  # V3.2: BF16 in DeepSeek's release
DIRECTIONS = ("fp8", "dequant", "fp4-experts")
QUANTIZATION_CONFIG = V3_QUANTIZATION_CONFIG
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tokenizer (fast and slow formats), chat template and generation files: what transformers'
# save_pretrained writes beside a model, and what `nanoseek tokenizer train` writes.
SIDE_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
              "chat_template.jinja", "chat_template.json", "generation_config.json"}


def is_quantised(name: str, t: torch.Tensor) -> bool:
    """The tensors DeepSeek-V3's and V3.2's releases store in FP8: 2-D Linear weights of
    attention (V3.2's indexer wq_b and wk included, its weights_proj not) and of the FFNs (not
    the empty shared-expert weights of a model with n_shared_experts 0: nothing to scale)."""
    return (t.ndim == 2 and t.numel() > 0 and QUANTISED.match(name) is not None
            and HIGH_PRECISION.search(name) is None)


def is_fp4_expert(name: str, t: torch.Tensor, cfg: ModelConfig) -> bool:
    """A routed expert's 2-D weight, in any spelling the checkpoint uses (what
    `fp4-experts` writes in FP4)."""
    key = ckpt_names.from_disk(name, cfg)
    return t.ndim == 2 and t.numel() > 0 and key is not None and is_routed_expert_weight(key)


@dataclass
class ConvertReport:
    direction: str  # "fp8", "dequant" or "fp4-experts"
    tensors: int = 0
    quantised: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rel_error_mean: float = 0.0  # over quantised tensors (FP8 / FP4 round trip vs the source)
    rel_error_max: float = 0.0
    max_abs_error: float = 0.0
    worst_tensor: str | None = None
    files: list[str] = field(default_factory=list)


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "bf16",
            progress: bool = True, overwrite: bool = False) -> ConvertReport:
    """to="fp8": quantise a checkpoint; to="dequant": FP8 -> `dtype` (bf16 | fp16 | fp32);
    to="fp4-experts": the routed experts to FP4. Tensors left in high precision are written
    in `dtype`, the router in its own dtype."""
    src, dst = Path(src), Path(dst)
    cfg, weight_map = _check_source(src, to, dtype)
    stored = _stored_bytes(src, weight_map)
    _check_dst(src, dst, overwrite)
    dst.mkdir(parents=True, exist_ok=True)
    report, errors, out_map = ConvertReport(direction=to), [], {}
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    with _progress(progress, sum(not is_scale(n, weight_map) for n in weight_map)) as advance:
        for fname, names in sorted(by_file.items()):
            out = _convert_file(src, cfg, names, weight_map, stored, to, dtype, report, errors, advance)
            report.bytes_out += sum(v.numel() * v.element_size() for v in out.values())
            atomic_write(dst / fname, lambda tmp, o=out: save_file(o, tmp, metadata={"format": "pt"}))
            out_map.update({n: fname for n in out})
            report.files.append(fname)
    if errors:
        report.rel_error_mean = sum(errors) / len(errors)
    _write_index(src, dst, out_map, report.bytes_out)
    _copy_side_files(src, dst)
    _write_config(src, dst, to, dtype)
    return report


def _check_source(src: Path, to: str, dtype: str) -> tuple[ModelConfig, dict[str, str]]:
    """The source's config and weight map, after refusing a conversion that makes no sense for it."""
    if to not in DIRECTIONS:
        raise ValueError(f"to must be one of {list(DIRECTIONS)}, got {to!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = read_config(src)  # a readable, valid config.json, or a clear error
    weight_map = checkpoint_files(src)
    has_fp8 = any(is_scale(n, weight_map) for n in weight_map)
    if to == "fp8" and has_fp8:
        raise CheckpointError(f"{src}: already an FP8 checkpoint (it has *_scale_inv or .scale "
                              "tensors); use --dequant to go back to BF16")
    if to == "fp8" and cfg.is_v4:
        raise CheckpointError(f"{src}: --fp8 writes DeepSeek-V3's FP8 layout; a DeepSeek-V4 model is "
                              "released in another (UE8M0 .scale, FP4 experts), which convert does not write")
    if to == "fp4-experts":
        _check_fp4_source(src, weight_map, has_fp8)
    if to == "dequant" and not has_fp8:
        raise CheckpointError(f"{src}: no FP8 weights (no *_scale_inv or .scale tensors) to dequantise")
    return cfg, weight_map


def _check_fp4_source(src: Path, weight_map: dict[str, str], quantised: bool) -> None:
    """fp4-experts reads high-precision weights with one tensor per expert projection."""
    if quantised:
        raise CheckpointError(f"{src}: already quantised (it has *_scale_inv or .scale tensors); "
                              "--dequant it first, then write its experts in FP4")
    fused = next((n for n in weight_map if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))),
                 None)
    if fused:
        raise CheckpointError(f"{src}: tensor {fused!r} holds every expert fused; fp4-experts writes "
                              "one tensor per expert: load and save it with nanoseek first")


def _convert_file(src: Path, cfg: ModelConfig, names: list[str], weight_map: dict[str, str],
                  stored: dict[str, int], to: str, dtype: str, report: ConvertReport,
                  errors: list[float], advance) -> dict[str, torch.Tensor]:
    """One source shard's tensors, converted (FP8 weights with their scales, wherever the
    scales are stored), contiguous and ready to write; the report is updated as it goes."""
    out: dict[str, torch.Tensor] = {}
    wanted = {n: weight_map[n] for n in names}
    wanted.update({sn: weight_map[sn] for n in names if (sn := scale_name(n, weight_map))})
    for name, t, _ in read_tensors(src, wanted):
        report.tensors += 1
        report.bytes_in += stored[name] + stored.get(scale_name(name, weight_map) or "", 0)
        fp4 = to == "fp4-experts" and is_fp4_expert(name, t, cfg)
        if fp4 or (to == "fp8" and is_quantised(name, t)):
            q, s = quantize_fp4(t) if fp4 else quantize_weight(t)
            err = quant_error(t, dequantize_fp4(q, s) if fp4 else dequantize_weight(q, s))
            errors.append(err["rel_error"])
            if err["rel_error"] >= report.rel_error_max:
                report.rel_error_max, report.worst_tensor = err["rel_error"], name
            report.max_abs_error = max(report.max_abs_error, err["max_abs_error"])
            out[name], out[name.removesuffix("weight") + "scale" if fp4 else name + "_scale_inv"] = q, s
            report.quantised += 1
        else:
            if to == "dequant" and scale_name(name, weight_map):
                report.quantised += 1
            out[name] = t if _stays(name, t, cfg) else t.to(DTYPES[dtype])
        advance()
    return {n: v.contiguous() for n, v in out.items()}


def _stays(name: str, t: torch.Tensor, cfg: ModelConfig) -> bool:
    """Integer tables and what the model keeps in FP32 (hf.keep_fp32 of its state-dict name,
    in whichever spelling the checkpoint has it) keep their dtype whatever --dtype says."""
    if not t.is_floating_point():
        return True
    key = ckpt_names.from_disk(name, cfg)
    return keep_fp32(key if key is not None else name)


def _stored_bytes(src: Path, weight_map: dict[str, str]) -> dict[str, int]:
    """Bytes each source tensor takes on disk, from the safetensors headers (its data_offsets),
    so every stored dtype counts as it is: FP8 and UE8M0 scales one byte, FP4 half a byte."""
    out = {}
    for fname in sorted(set(weight_map.values())):
        try:
            with open(src / fname, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            out.update({n: v["data_offsets"][1] - v["data_offsets"][0]
                        for n, v in header.items() if n != "__metadata__"})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{src / fname}: cannot read its safetensors header ({e})") from None
    return out


def _check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the destination must differ from the source")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (pass --overwrite to replace its files)")


def _write_index(src: Path, dst: Path, out_map: dict[str, str], total: int) -> None:
    index = dst / INDEX_FILE
    if (src / INDEX_FILE).exists():
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(out_map.items()))}, indent=2))
    elif index.exists():
        index.unlink()


def checkpoint_side_files(src: Path) -> list[Path]:
    """The files beside the weights that are part of a checkpoint: tokenizer, chat template
    and generation files, and the remote-code modules config.json's auto_map names. A run
    directory's other files (train_state.pt, the report, its plots) are not."""
    auto_map = json.loads((src / "config.json").read_text()).get("auto_map") or {}
    modules = {v.split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)}
    files = [p for p in sorted(src.iterdir()) if p.is_file() and p.name in SIDE_FILES | modules]
    templates = src / "additional_chat_templates"  # transformers' named chat templates
    if templates.is_dir():
        files += sorted(p for p in templates.iterdir() if p.is_file() and p.suffix == ".jinja")
    return files


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation files travel with the weights; nothing else does."""
    for p in checkpoint_side_files(src):
        target = dst / p.relative_to(src)
        target.parent.mkdir(exist_ok=True)
        atomic_write(target, lambda tmp, p=p: shutil.copyfile(p, tmp))


def _write_config(src: Path, dst: Path, to: str, dtype: str) -> None:
    raw = json.loads((src / "config.json").read_text())
    if to in ("fp8", "fp4-experts"):
        raw["quantization_config"] = dict(QUANTIZATION_CONFIG if to == "fp8" else FP4_EXPERTS_CONFIG)
        raw["torch_dtype"] = "bfloat16" if dtype == "bf16" else str(DTYPES[dtype]).removeprefix("torch.")
    else:
        for key in ("quantization_config", "expert_dtype", "scale_fmt"):  # the last two: V4's
            raw.pop(key, None)
        raw["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    atomic_write_text(dst / "config.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")


class _progress:
    """A rich progress bar over tensors (silent when disabled, e.g. under --json)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress
        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("converting tensors", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
