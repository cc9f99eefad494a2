"""Which precision a training run uses when asked for `auto`, and why.

bf16 autocast pays only where the hardware multiplies bf16 natively: a CUDA device with
bf16 support, or a CPU with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`). A CPU without
them emulates bf16 matmuls through fp32 and is *slower* in bf16 (measured on a 2-core
AVX-512 VM without those flags: 9 GFLOP/s in bf16 against 57 in fp32 for 1024² matrices),
so there `auto` is fp32. The CPU's flags decide (from /proc/cpuinfo); where they cannot be
read (not Linux, or an ARM CPU whose `bf16` feature says nothing of its speed), a quick
measured matmul decides.

Fast bf16 matmuls are not yet a faster step. On a CPU, `auto` then times the model's own
forward + backward at the run's batch shape in fp32 and in bf16 autocast, and keeps bf16
only where it wins by `MIN_STEP_GAIN`. The margin is wide because the trial sees only part
of a step. Measured on a 2-core AMD EPYC with avx512_bf16 (bf16 matmuls 1.8-2.6x fp32's):
- the tiny preset's forward + backward ran 1.0-1.4x faster in bf16 from one trial to the
  next, but its whole training loop (the speedrun's, 60 steps) ran 0.92x at two threads
  and 1.0x at one: its matrices are small, and per-operator work and the casts of freshly
  updated weights eat the gain;
- the same layout at hidden 768 ran 1.8x.
The reason, with the measured gain, travels into run.json.

Whatever the precision, a run keeps fp32 master weights and optimizer state (autocast
casts per op; the parameters stay fp32), and the router and the losses run in fp32 (see
model/moe.py `Gate.forward` and `CausalLM._ce_sum`), as DeepSeek-V3 trains.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_STEP_GAIN = 1.5  # bf16 must make the trial's forward + backward this much faster
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
                     trial: Callable[[], tuple[float, float]] | None = None) -> tuple[str, str]:
    """(precision, why): an explicit precision as asked; `auto` bf16 where it is fast. On a
    CPU with fast bf16, `trial()` -> (fp32 seconds, bf16 seconds) of the run's own step
    decides (see the module's docstring); without one, the flags alone do."""
    if precision != "auto":
        return precision, "asked for"
    device = torch.device(device)
    fast, why = fast_bf16(device.type)
    if not fast or trial is None or device.type != "cpu":
        return ("bf16" if fast else "fp32"), f"auto: {why}"
    t32, t16 = trial()
    gain = t32 / t16
    if gain >= MIN_STEP_GAIN:
        return "bf16", f"auto: {why}; this model's forward + backward measured {gain:.2f}x faster in bf16"
    return "fp32", (f"auto: {why}, but this model's forward + backward measured {gain:.2f}x in bf16 "
                    f"(bf16 needs {MIN_STEP_GAIN}x)")


def step_seconds(model: torch.nn.Module, batch_size: int, seq_len: int,
                 agree: Callable[[float], float] | None = None, mtp: bool = True) -> tuple[float, float]:
    """(fp32, bf16 autocast) seconds of one forward + backward on a batch of random tokens of
    the run's shape: `model.loss` (MTP included), or with mtp=False the main head's
    cross-entropy alone (what RL trains). The best of two after a warm-up each, alternating
    so that load from elsewhere hits both alike. Leaves no trace: no gradients, the MoE's
    load counts (the next bias update's input) and the RNG as they were. agree(seconds) ->
    the figure every rank uses (several processes must choose alike)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)
    moe = model.moe_layers() if hasattr(model, "moe_layers") else []
    loads = [m.tokens_per_expert.clone() for m in moe]

    def once(precision: str) -> float:
        t = time.perf_counter()
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
              else contextlib.nullcontext()):
            if mtp:
                loss = model.loss(ids[:, :-1], ids[:, 1:]).loss
            else:
                loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(),
                                                         ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    with torch.random.fork_rng(devices=[]):
        once("fp32"), once("bf16")
        times = {"fp32": [], "bf16": []}
        for _ in range(2):
            for precision in times:
                times[precision].append(once(precision))
    for m, load in zip(moe, loads):
        m.tokens_per_expert.copy_(load)
    best = [min(times["fp32"]), min(times["bf16"])]
    if agree is not None:
        best = [agree(t) for t in best]
    return best[0], best[1]


def peak_dtype(precision: str) -> torch.dtype:
    """The matmul dtype whose measured peak is MFU's denominator for this precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
