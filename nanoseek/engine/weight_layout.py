"""The memory layout of the engine's linear weights on a CPU: as loaded, or k-major.

`nn.Linear` keeps W as [out, in], rows contiguous, and computes x W^T: the GEMM's second
operand is transposed. At the few rows of a decode step MKL runs that product several times
slower than the same product with W stored [in, out] (a 16 x 256 by 256 x 128 product took
48 us against 11 us on a 2-core Xeon, fp32, one thread); at prefill's thousands of rows the
two are within a few percent. `W.t().contiguous().t()` is still an [out, in] tensor holding
the same numbers, only its strides change, so the model code, its state dict and what a save
writes stay as they were, and F.linear hands the BLAS an untransposed operand.

Whether it pays depends on the CPU and the BLAS build, so "auto" times both layouts on the
model's own weight shapes at decode's row counts and keeps the faster one. GPUs keep the
layout as loaded (cuBLAS takes either, and FP8's scaled_mm wants its own).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("auto", "k-major", "as-loaded")
ROWS = (4, 16, 64)  # decode batches the timing stands for
CAP = 2048  # a weight's sides are capped at this for timing: the choice, not a full product, is wanted
GAIN = 0.9  # k-major is kept only when it takes at most this fraction of the as-loaded time
_chosen: dict[tuple, bool] = {}  # (shapes, dtype, threads) -> k-major faster: timed once a process


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's plain `nn.Linear`s with floating weights on a CPU: not FP8Linear, LoRA or
    NF4 wrappers, nor subclasses that read their weight in their own way (V4's GroupedLinear);
    nor a weight that another module shares (tied embeddings read it by rows)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    return [m for m in linears if m.weight.device.type == "cpu" and m.weight.is_floating_point()
            and type(m.weight.data) is torch.Tensor and id(m.weight) not in shared]


def is_k_major(w: torch.Tensor) -> bool:
    """W [out, in] stored column by column (stride 1 along out), the layout F.linear hands the
    BLAS untransposed: alone (columns `out` apart) or as a block of a wider tensor (further
    apart: the experts' views into their stack, model/expert_stack.py)."""
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) >= w.shape[0]


def best_time(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` calls of fn, after one to warm up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_shape(shape: tuple[int, int], rows: int, dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """(seconds as loaded, seconds k-major) of one F.linear of `rows` rows by a weight [out, in]."""
    w = torch.randn(*shape, dtype=dtype)
    wk = w.t().contiguous().t()
    x = torch.randn(rows, shape[1], dtype=dtype)
    return best_time(lambda: F.linear(x, w), repeats), best_time(lambda: F.linear(x, wk), repeats)


def time_layouts(shapes: dict[tuple[int, int], int], dtype: torch.dtype) -> tuple[float, float]:
    """(seconds as loaded, seconds k-major) of one F.linear per weight, counted with its
    multiplicity, at each of ROWS rows; shapes {(out, in): count}, capped at CAP a side."""
    loaded = kmajor = 0.0
    for (out_f, in_f), count in shapes.items():
        for rows in ROWS:
            a, b = time_shape((min(out_f, CAP), min(in_f, CAP)), rows, dtype)
            loaded, kmajor = loaded + count * a, kmajor + count * b
    return loaded, kmajor


@torch.no_grad()
def apply_weight_layout(model: nn.Module, layout: str = "auto") -> str:
    """Lay out the model's plain linear weights (`plain_linears`) as `layout` says, in place;
    returns what was chosen: "k-major", or "as-loaded" (the weights left as they are; also for
    a model with no plain linear on a CPU). "auto": k-major where `time_layouts` finds it
    faster by 1 / GAIN or more."""
    if layout not in LAYOUTS:
        raise ValueError(f"weight_layout={layout!r}: expected one of {list(LAYOUTS)}")
    linears = plain_linears(model)
    if not linears or layout == "as-loaded":
        return "as-loaded"
    if layout == "auto":
        shapes: dict[tuple[int, int], int] = {}
        for m in linears:
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
        key = (tuple(sorted(shapes.items())), linears[0].weight.dtype, torch.get_num_threads())
        if key not in _chosen:
            loaded, kmajor = time_layouts(shapes, linears[0].weight.dtype)
            _chosen[key] = kmajor <= GAIN * loaded
        if not _chosen[key]:
            return "as-loaded"
    for m in linears:
        if not is_k_major(m.weight):
            m.weight.data = m.weight.data.t().contiguous().t()
    return "k-major"
