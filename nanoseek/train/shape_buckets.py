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

So GRPO's packed rows and head rows (shared_prefix.py) are rounded up to `bucket(n)`
(multiples of 8 up to 64, then eight sizes per octave: at most 12.5 % padding) where the
update runs in bf16 / fp16 on a CPU. The padding is invisible to the log-probs and to the
MoE's load (its `token_mask`). DPO's pairs are not bucketed: their widths vary over a
narrow range; bucketed to powers of two below 64 (a first version of `bucket`), 150 bf16
DPO steps took 66 s against 55 s, and the peak RSS barely moved (961 against 1,007 MB). The MoE pads its expert slices its own way (model/moe.py
`padded_rows`).
"""

from __future__ import annotations

import torch


def bucket(n: int) -> int:
    """n >= 1 rounded up to a multiple of 8, or beyond 64 of 1/8 of the power of two at or
    below n: eight sizes per octave (33 -> 40, 65 -> 72, 100 -> 104, 1000 -> 1024), so at
    most 7 extra up to 64 and at most 12.5 % beyond."""
    if n < 1:
        raise ValueError(f"bucket: n must be >= 1, got {n}")
    step = 8 if n < 64 else 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def buckets_pay(model: torch.nn.Module) -> bool:
    """Whether `model`'s matmuls run in bf16 / fp16 on a CPU right now: its weights are
    (train/bf16_weights.py swaps bf16 copies in) or CPU autocast is on."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return False
    return p.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
