"""Which precision a training run uses when asked for `auto`, and why.

bf16 autocast pays only where the hardware multiplies bf16 natively: a CUDA device with
bf16 support, or a CPU with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`). A CPU without
them emulates bf16 matmuls through fp32 and is *slower* in bf16 (measured on a 2-core
AVX-512 VM without those flags: 9 GFLOP/s in bf16 against 57 in fp32 for 1024² matrices),
so there `auto` is fp32. The CPU's flags decide (from /proc/cpuinfo); where they cannot be
read (not Linux, or an ARM CPU whose `bf16` feature says nothing of its speed), a quick
measured matmul decides.

Fast bf16 matmuls alone do not make a faster training step. On a CPU `auto` also asks for
a model at least `CPU_BF16_MIN_HIDDEN` wide. Measured on a 2-core AMD EPYC with avx512_bf16
(bf16 matmuls 1.8-2.6x fp32's), the speedrun's own training step (tiny preset, hidden 256,
8 x 256 tokens, 2 threads), fp32 and one bf16 variant alternating steps in one process,
median:
- bf16 autocast: 1.03x (casts per operator);
- bf16 weight copies (train/numerics/bf16_weights.py): 1.01x. oneDNN builds a bf16 kernel for every
  new matmul shape, and the MoE's expert loads change every step;
- weight copies with the expert slices padded to a few lengths (model/moe.py
  `padded_rows`): 1.32x (3,981 against 3,006 tok/s; 1.28x in an earlier pair).
Narrower models are not measured and stay fp32 (the tests' tiny models among them, whose
exactness checks need fp32). On a CPU with AMX (shared/notes/precision-on-cpu.md) autocast
ran the tiny preset 0.56x and hidden 768 1.17x; copies and padding were not measured there.
The rule is deterministic on purpose: one command, one precision, however loaded the
machine. The reason travels with the choice into run.json.

Whatever the precision, a run keeps fp32 master weights and optimizer state (bf16 runs on
bf16 copies of them, or under autocast on several processes), and the router and the
losses run in fp32 (see model/moe.py `Gate.forward` and `CausalLM._ce_sum`), as
DeepSeek-V3 trains.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_BF16_MIN_HIDDEN = 256  # narrower models are not measured in bf16 on a CPU (above)
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The x86 `flags` of the first CPU in /proc/cpuinfo; None where there is no such line."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split())
    except OSError:
        pass
    return None


def bf16_matmul_speedup(n: int = 512, repeats: int = 3) -> float:
    """Best fp32 time / best bf16 time of an n x n matmul on this CPU (> 1: bf16 is faster)."""
    def best(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: the first call picks the kernel
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)
    return best(torch.float32) / best(torch.bfloat16)


def cpu_fast_bf16(flags: set[str] | None) -> tuple[bool, str]:
    """(fast bf16?, why) for a CPU with these flags (None: unknown, so measure)."""
    if flags is not None:
        have = [f for f in BF16_CPU_FLAGS if f in flags]
        if have:
            return True, f"CPU with {'/'.join(have)}"
        return False, (f"CPU without {'/'.join(BF16_CPU_FLAGS)} (bf16 matmuls are emulated there, "
                       "slower than fp32)")
    speedup = bf16_matmul_speedup()
    return speedup > 1.2, f"CPU flags unknown; measured bf16 matmul {speedup:.2f}x fp32"


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str) -> tuple[bool, str]:
    """(fast bf16?, why) for a device type ("cuda", "cpu", ...); decided once per process."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA with bf16 ({torch.cuda.get_device_name()})"
        return False, f"CUDA without bf16 ({torch.cuda.get_device_name()})"
    if device_type == "cpu":
        return cpu_fast_bf16(cpu_flags())
    return False, f"{device_type}: bf16 speed not known"


def choose_precision(precision: str, device: torch.device,
                     hidden_size: int | None = None) -> tuple[str, str]:
    """(precision, why): an explicit precision as asked; `auto` bf16 where it is fast: on a
    CPU only for a model at least CPU_BF16_MIN_HIDDEN wide (None: width unknown)."""
    if precision != "auto":
        return precision, "asked for"
    device = torch.device(device)
    fast, why = fast_bf16(device.type)
    if fast and device.type == "cpu" and hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN:
        return "fp32", (f"auto: {why}, but hidden size {hidden_size} < {CPU_BF16_MIN_HIDDEN}: "
                        "narrower than bf16 was measured to pay on a CPU")
    return ("bf16" if fast else "fp32"), f"auto: {why}"


def hidden_size_of(model: torch.nn.Module) -> int | None:
    """The width `choose_precision` weighs: the model's (or its policy's) config.hidden_size."""
    for m in (model, getattr(model, "policy", None)):
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    return None


def peak_dtype(precision: str) -> torch.dtype:
    """The matmul dtype whose measured peak is MFU's denominator for this precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
