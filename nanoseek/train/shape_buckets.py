"""A few fixed shapes for the variable-length batches of RL updates in bf16 on a CPU.

oneDNN, which runs bf16 / fp16 matmuls on a CPU, builds (JIT-compiles) a kernel for every
new shape and keeps it in its primitive cache (1,024 entries by default). fp32 goes through
MKL and has no such cost. A GRPO update's packed batch has a new length every step (the
completions' lengths change), so in bf16 every step built new kernels, and the cache grew
the process: measured on the 2-core AMD EPYC (avx512_bf16), forward + backward of one
bf16 [M, 256] x [256, 256] linear over 1,500 distinct M took the peak RSS from 221 MB to
1,721 MB (fp32: 364 MB); with M rounded up to multiples of 32 (313 distinct), to 1,068 MB,
in 13 % less time. The RL speedrun's process (SFT, then ~80 GRPO steps) peaked at 4.0 GB
with fp32 updates and at 5.4-5.7 GB with bf16 ones before these buckets.

So the update's lengths are rounded up to `bucket(n)` (powers of two up to 64, then eight
sizes per octave: at most 12.5 % padding) where the step runs in bf16 / fp16 on a CPU:
GRPO's packed rows and head rows (shared_prefix.py) and DPO's pairs (dpo.py). The padding
is invisible to the results and to the MoE's load (its `token_mask`). The MoE pads its
expert slices in its own way (model/moe.py `padded_rows`).
"""

from __future__ import annotations

import torch


def bucket(n: int) -> int:
    """n >= 1 rounded up: a power of two up to 64, beyond it a multiple of 1/8 of the power
    of two below n (65 -> 72, 100 -> 104, 1000 -> 1024)."""
    if n < 1:
        raise ValueError(f"bucket: n must be >= 1, got {n}")
    if n <= 64:
        return 1 << (n - 1).bit_length()
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def buckets_pay(model: torch.nn.Module) -> bool:
    """Whether `model`'s matmuls run in bf16 / fp16 on a CPU right now: its weights are
    (train/bf16_weights.py swaps bf16 copies in) or CPU autocast is on."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return False
    return p.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
