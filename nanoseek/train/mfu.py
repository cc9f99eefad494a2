"""Model FLOPs utilisation against this machine's *measured* matmul peak.

A datasheet peak means little for a shared 2-core VM, so the peak is measured: the best
rate of large square fp32 (or bf16 on GPUs) matmuls, cached in
~/.cache/nanoseek/peak_flops.json per device, thread count and dtype.

Model FLOPs per trained token = 6 x (matmul parameters a token activates) + attention:
the input embedding is a lookup (no FLOPs); the output head runs once for the main model
and once more per MTP module; routed experts count only the num_experts_per_tok a
token is sent to. Causal attention costs 6 x H x (qk_head_dim + v_head_dim) x S/2 per
layer per token (scores and weighted values, forward + backward, half the keys on average).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig

CACHE = Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek")) / "peak_flops.json"


def count_params(model) -> dict:
    """Total parameters and those one token activates (routed experts not chosen removed)."""
    cfg: ModelConfig = model.config
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        inactive += (moe.n_experts - moe.top_k) * per_expert
    embed = model.model.embed_tokens.weight.numel()
    mtp = sum(p.numel() for p in model.mtp.parameters())
    return {"total": total, "activated": total - inactive, "embedding": embed, "mtp": mtp,
            "lm_head": model.lm_head.weight.numel(), "n_mtp": len(model.mtp),
            "layers": cfg.num_hidden_layers + len(model.mtp)}


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    cfg: ModelConfig = model.config
    p = count_params(model)
    matmul = p["activated"] - p["embedding"] + p["n_mtp"] * p["lm_head"]
    attn = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2) * p["layers"]
    return 6 * matmul + attn


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
    from nanoseek.checkpoint import atomic_write_text

    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
        cached[key] = max(value, float(cached.get(key, 0.0)))
        atomic_write_text(CACHE, json.dumps(cached, indent=2) + "\n")
    except (OSError, json.JSONDecodeError):
        pass  # a cache we cannot write is only a slower next run
