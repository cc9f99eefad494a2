"""Accelerator specs for `plan capacity`: a small table users extend.

Figures are the vendors' datasheet peaks for the SXM parts: dense (no sparsity) tensor
TFLOP/s, HBM bandwidth in TB/s (1e12 bytes/s) and memory in GB (1e9 bytes). Add a GPU
with `register_gpu`, a JSON file (`--gpu-file`: {"NAME": {"mem_gb": .., "bw_tbs": ..,
"bf16_tflops": .., "fp8_tflops": ..}}) or `--gpu custom --gpu-mem-gb .. --gpu-bw-tbs ..
--gpu-tflops ..`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nanoseek.config import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gb: float
    bw_tbs: float
    bf16_tflops: float
    fp8_tflops: float | None = None  # None: no FP8 tensor cores (compute runs in BF16)
    gpus_per_node: int = 8

    def tflops(self, dtype: str) -> float:
        """Peak for matmuls whose inputs are `dtype` (FP8 only where the tensor cores have it)."""
        return self.fp8_tflops if dtype == "fp8" and self.fp8_tflops else self.bf16_tflops

    def to_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, GPU] = {
    "H100": GPU("H100 SXM 80GB", mem_gb=80, bw_tbs=3.35, bf16_tflops=989, fp8_tflops=1979),
    # H800: the export H100 (same compute and HBM, NVLink cut to 400 GB/s); what V3 trained on
    "H800": GPU("H800 SXM 80GB", mem_gb=80, bw_tbs=3.35, bf16_tflops=989, fp8_tflops=1979),
    "H200": GPU("H200 SXM 141GB", mem_gb=141, bw_tbs=4.8, bf16_tflops=989, fp8_tflops=1979),
    "A100": GPU("A100 SXM 80GB", mem_gb=80, bw_tbs=2.039, bf16_tflops=312, fp8_tflops=None),
}


def register_gpu(key: str, gpu: GPU) -> None:
    GPUS[key] = gpu


def load_gpu_file(path: str | Path) -> None:
    """Add every entry of a JSON file to the table."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--gpu-file {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--gpu-file {path}: not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise ConfigError(f"--gpu-file {path}: expected an object {{NAME: spec}}")
    allowed = {f.name for f in fields(GPU)}
    for key, spec in entries.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"--gpu-file {path}: entry {key!r} is not an object")
        unknown = set(spec) - allowed
        missing = {"mem_gb", "bw_tbs", "bf16_tflops"} - set(spec)
        if unknown or missing:
            raise ConfigError(f"--gpu-file {path}: entry {key!r}: "
                              + (f"unknown field(s) {sorted(unknown)}" if unknown else
                                 f"missing field(s) {sorted(missing)}"))
        register_gpu(key, _checked(GPU(**{"name": key, **spec})))


def custom_gpu(mem_gb: float | None, bw_tbs: float | None, tflops: float | None,
               fp8_tflops: float | None = None, gpus_per_node: int = 8) -> GPU:
    if None in (mem_gb, bw_tbs, tflops):
        raise ConfigError("--gpu custom needs --gpu-mem-gb, --gpu-bw-tbs and --gpu-tflops")
    return _checked(GPU("custom", mem_gb, bw_tbs, tflops, fp8_tflops, gpus_per_node))


def get_gpu(key: str) -> GPU:
    for k, g in GPUS.items():
        if k.lower() == key.lower():
            return g
    raise ConfigError(f"unknown GPU {key!r}; choose one of {sorted(GPUS)} or 'custom' "
                      "(or add entries with --gpu-file)")


def _checked(g: GPU) -> GPU:
    for name in ("mem_gb", "bw_tbs", "bf16_tflops", "gpus_per_node"):
        if not getattr(g, name) or getattr(g, name) <= 0:
            raise ConfigError(f"GPU {g.name!r}: {name} must be positive, got {getattr(g, name)!r}")
    return g
