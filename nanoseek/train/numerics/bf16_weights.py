"""bf16 training with fp32 master weights, without autocast: bf16 copies of the weights,
kept for the run and refreshed from the masters before each step.

Why not autocast: autocast casts per operator. Every linear casts its fp32 weight (and,
in the backward, its gradient) and element-wise work runs in fp32 between bf16 matmuls.
At small widths those casts and the wider element-wise traffic eat what the bf16 matmuls
save. Measured on the 2-core AMD EPYC with avx512_bf16 (the speedrun's training step: tiny
preset, hidden 256, 8 x 256 tokens, 2 threads; fp32 and one bf16 variant alternating steps
in one process): autocast 1.03x fp32, these copies 1.01x, these copies with the MoE's
expert slices padded to a few lengths (model/moe.py `padded_rows`, which needs the
activations themselves in bf16, as here) 1.32x.

How: `BF16Weights(model)` makes one bf16 copy per floating-point parameter. Inside
`with copies:` the model's modules hold the copies in place of their parameters, so the
forward and backward run in bf16 end to end. A hook on each copy folds its gradient, as
soon as it is accumulated, into the master's `.grad` in fp32 (summed across
micro-batches in fp32, not bf16). Outside the context the model holds its fp32 masters again:
the optimizer, gradient clipping, checkpoints and `state_dict()` see only fp32, as DeepSeek-V3
trains (fp32 master weights, gradients and optimizer state).

What stays fp32: the parameters of modules that set `runs_in_fp32 = True` (the MoE router,
model/moe.py `Gate`; V4's mHC), the parameters a module names in `fp32_parameters` (names
relative to it: V4's attention sinks, its compressors' projections, position biases and
norms), buffers (the router's bias), and anything the model itself computes in fp32
(RMSNorm's statistics, the softmax scores, the losses). Parameters that are not
floating point (e.g. 4-bit quantised bases) are left as they are.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from nanoseek.model.precision import fp32_kept


class BF16Weights:
    """bf16 working copies of a model's fp32 parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, name, master)
        self.copy_of: dict[int, nn.Parameter] = {}  # id(master) -> copy; tied ones share one
        self.masters: list[nn.Parameter] = []
        self.copies: list[nn.Parameter] = []
        kept = fp32_kept(model)
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in kept:
                    continue
                if id(p) not in self.copy_of:  # a tied parameter met again reuses its copy
                    if not p.is_floating_point():
                        continue
                    copy = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                    if p.requires_grad:
                        copy.register_post_accumulate_grad_hook(self._fold_into(p))
                    self.copy_of[id(p)] = copy
                    self.masters.append(p)
                    self.copies.append(copy)
                self.slots.append((module, name, p))

    @staticmethod
    def _fold_into(master: nn.Parameter):
        """A hook that moves the copy's bf16 gradient into the master's fp32 `.grad`."""
        def fold(copy: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = copy.grad.to(master.dtype)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None
        return fold

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the masters into the bf16 copies (after an optimizer step or a resume)."""
        if self.copies:
            torch._foreach_copy_(self.copies, [p.detach() for p in self.masters])

    def __enter__(self):
        self.refresh()
        for module, name, master in self.slots:
            module._parameters[name] = self.copy_of[id(master)]
        return self

    def __exit__(self, *exc) -> None:
        for module, name, master in self.slots:
            module._parameters[name] = master


def compute_precision(precision: str, device: torch.device, copies: BF16Weights | None = None):
    """The context a forward (and its backward) runs in for `precision`: the bf16 copies
    when given, autocast for bf16 / fp16 otherwise, nothing for fp32."""
    if copies is not None:
        return copies
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
