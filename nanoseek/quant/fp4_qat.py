"""FP4 quantisation-aware training of the routed experts: fake-quantised weights, straight-through gradients.

DeepSeek-V4 trains its MoE experts aware of the FP4 they are released in (the V4 report's FP4
QAT, run in the late stage of training): the forward multiplies by the weight as FP4 would
store it, the backward hands the gradient to the full-precision master unchanged, so the
optimizer keeps moving the masters while the loss sees the quantised model. The format is
quant/fp4.py's (V4-Flash's experts, OCP MXFP4): per row, each group of 32 inputs gets one
power-of-two scale s = 2^ceil(log2(max|w| / 6)), and each weight the nearest E2M1 value of
w / s, ties to the even code:

    Q(w) = s · E2M1(w / s),   E2M1 ∈ {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6},   ∂L/∂w := ∂L/∂Q(w)

`fp4_round` computes Q without packing codes (steps of 0.5 below 2, 1 below 4, 2 up to 6;
every operation exact in fp32), and equals dequantize_fp4(*quantize_fp4(w)) bit for bit, so
the model trained is the model the FP4 checkpoint holds (checkpoint/hf.py, `fp4_experts`).

How it enters the model: `set_fp4_experts(model, True)` turns each routed expert's
gate/up/down Linear into an `FP4QATLinear` by changing its class in place: the same object,
the same Parameter (the optimizer's, and the one BF16Weights swaps its bf16 copy in for),
the same state-dict names; only `forward` differs. `False` turns them back. A
parametrization would rename the state dict (`parametrizations.weight.original`), and a
forward hook cannot change the weight a Linear reads. The shared experts, attention and
dense FFNs stay as they are, as in V4's release. Under bf16 training the forward quantises
the bf16 copy of a master; a power of two times an E2M1 value is exact in bf16.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.quant.fp4 import FP4_MAX, GROUP
from nanoseek.quant.fp8 import ue8m0_scale

# A routed expert's projections (state-dict style names, main layers and MTP modules alike):
# `model.layers.3.mlp.experts.7.up_proj`, `mtp.0.mlp.experts.2.down_proj`.
ROUTED_EXPERT = re.compile(r"(^|\.)mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def fp4_round(w: torch.Tensor) -> torch.Tensor:
    """w [..., N] -> Q(w) in w's dtype: each group of 32 along the last dim scaled by its
    UE8M0 power of two, rounded to the nearest E2M1 value (ties to even), scaled back.
    Dividing and multiplying by powers of two and rounding a multiple of a power-of-two
    step are exact in fp32, so no second rounding enters."""
    N = w.shape[-1]
    G = -(-N // GROUP)
    x = w.float() if N % GROUP == 0 else F.pad(w.float(), (0, G * GROUP - N))
    groups = x.unflatten(-1, (G, GROUP))
    scale = ue8m0_scale(groups.abs().amax(dim=-1, keepdim=True), FP4_MAX)
    y = groups / scale
    mag = y.abs().clamp(max=FP4_MAX)
    # E2M1's spacing: 0.5 between 0 and 2 (subnormals and the first binade), 1 up to 4, 2 up
    # to 6; torch.round rounds half to even, and an even multiple of the step is the even code
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    q = torch.round(mag / step) * step
    q = q.copysign(y) + 0.0  # the sign back; + 0.0 turns -0 into +0, as code 0 decodes
    return (q * scale).flatten(-2)[..., :N].to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Q(w) forward; the incoming gradient passed to w as it is (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return fp4_round(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize_fp4(w: torch.Tensor) -> torch.Tensor:
    """Q(w) with a straight-through gradient to w."""
    return _StraightThrough.apply(w)


class FP4QATLinear(nn.Linear):
    """A Linear whose forward multiplies by Q(weight) (see the module docstring); never
    constructed, only switched to and from nn.Linear by `set_fp4_experts`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_fp4(self.weight), self.bias)


def routed_expert_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of every routed expert projection of `model`, on or off."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ROUTED_EXPERT.search(name)]


def set_fp4_experts(model: nn.Module, on: bool) -> int:
    """Fake-quantise the routed experts' weights in every forward from now on (on=True), or
    stop (False); returns how many Linears that covers. A model without routed experts (or
    whose experts the regex does not name) is an error rather than a silent no-op."""
    linears = routed_expert_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no routed experts (modules named "
                         "'...mlp.experts.E.gate_proj|up_proj|down_proj') to quantise to FP4")
    from torch.distributed.tensor import DTensor
    for name, m in linears:
        if on and m.in_features % 2:
            raise ValueError(f"{name}: FP4 packs two inputs per byte; in_features {m.in_features} is odd")
        if on and isinstance(m.weight, DTensor):  # nanoseek's FSDP and TP leave routed experts whole
            raise ValueError(f"{name}: FP4 QAT of a DTensor-sharded expert weight ({m.weight.placements}) "
                             "is not supported; shard routed experts by EP (each rank its own, whole)")
        m.__class__ = FP4QATLinear if on else nn.Linear
    return len(linears)


def fp4_experts_on(model: nn.Module) -> bool:
    """Whether the routed experts are fake-quantised now."""
    return any(type(m) is FP4QATLinear for _, m in routed_expert_linears(model))
