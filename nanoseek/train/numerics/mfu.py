"""Model FLOPs utilisation against this machine's *measured* matmul peak.

A datasheet peak means little for a shared 2-core VM, so the peak is measured: the best
rate of large square fp32 (or bf16 on GPUs) matmuls, cached in
~/.cache/nanoseek/peak_flops.json per device, thread count and dtype.

Parameter counts and model FLOPs come from `nanoseek.calc` (one source of truth, the
DeepSeek conventions documented there: `count_params(cfg).summary()` gives total /
activated of the main model, activated without the embedding table, a lookup with no
matmul, and the MTP module apart).
FLOPs per trained token = `flops_report(cfg, seq_len, include_mtp=True).train_per_token`:
6 x activated matmul weights (router, attention, shared + chosen routed experts, the output
head once for the main model and once more per MTP module; norms and the embedding count 0)
+ causal attention, since training runs the MTP module too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


CACHE = Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek")) / "peak_flops.json"


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, the MTP module included)."""
    from nanoseek.calc.flops import flops_report

    return flops_report(model.config, seq_len=seq_len, include_mtp=True).train_per_token


def _key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    return f"{name}/{dtype}".replace(" ", "_")


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       n: int | None = None, repeats: int = 5, use_cache: bool = True,
                       remeasure: bool = False) -> float:
    """Best matmul FLOP/s of this device, measured once and cached (`nanoseek peak
    --remeasure` measures again and keeps the higher figure: on a shared machine the
    best measurement is the closest to the real peak)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    key = _key(device, dtype)
    if use_cache and not remeasure and CACHE.exists():
        try:
            cached = json.loads(CACHE.read_text())
            if key in cached:
                return float(cached[key])
        except (json.JSONDecodeError, OSError):
            pass
    best = _measure(device, dtype, n, repeats, key if use_cache else None)
    if use_cache and CACHE.exists():
        try:
            return max(best, float(json.loads(CACHE.read_text()).get(key, 0.0)))
        except (json.JSONDecodeError, OSError):
            pass
    return best


def _measure(device, dtype, n, repeats, key) -> float:
    n = n or (8192 if device.type == "cuda" else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t))
    if key:
        _store(key, best)
    return best


def _store(key: str, value: float) -> None:
    from nanoseek.checkpoint.atomic import atomic_write_text

    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
        cached[key] = max(value, float(cached.get(key, 0.0)))
        atomic_write_text(CACHE, json.dumps(cached, indent=2) + "\n")
    except (OSError, json.JSONDecodeError):
        pass  # a cache we cannot write is only a slower next run
