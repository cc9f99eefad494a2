"""QLoRA's frozen base: the targeted linears stored in 4-bit NormalFloat (NF4) through
bitsandbytes, the LoRA adapters (lora.py) trained in full precision on top.

NF4 (Dettmers et al., 2023): each block of 64 consecutive weights is scaled by its absmax
into [-1, 1] and every weight is stored as the index of the nearest of 16 levels (the
quantiles of a normal distribution, 0 and ±1 exact), 4 bits each. The error of one weight
is at most half the widest gap between neighbouring levels times its block's absmax:
the widest gap is between -1 and -0.6962, so |w - NF4(w)| <= 0.1519·absmax(block)
(`NF4_MAX_REL_ERROR`). Storage per weight: 4 bits + its block's absmax, which QLoRA's
double quantisation (bitsandbytes' default) stores in 8 bits with one fp32 scale per 256
blocks: about 4.13 bits against 32 (7.75x less).

Which linears: those LoRA targets whose input width is a multiple of the 64-weight block.
bitsandbytes 0.50's CPU kernel dequantises a 2-D weight row by row, so a row that does not
fill whole blocks comes back wrong (measured: errors of 2.0 on N(0,1) weights shaped
[96, 48]); such linears stay in fp32 and are listed. Every DeepSeek size (and `tiny`'s) is a
multiple of 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.train.lora import target_names

NF4_BLOCK = 64
NF4_MAX_REL_ERROR = 0.1519  # (1 - 0.6962) / 2: half the widest gap between NF4 levels


@dataclass
class NF4Report:
    """What quantising the base saved and cost."""
    quantized: int = 0                 # linears stored in NF4
    fp32_bytes: int = 0                # their weights in fp32
    nf4_bytes: int = 0                 # the same weights in NF4 (codes + block absmax)
    skipped: list[str] = field(default_factory=list)  # targeted linears kept in fp32
    logits_max_abs_error: float | None = None
    logits_rel_error: float | None = None  # ||Δlogits|| / ||logits|| over the probe

    def describe(self) -> str:
        line = (f"QLoRA base: {self.quantized} linears in NF4, {self.fp32_bytes / 2**20:.2f} MiB fp32 -> "
                f"{self.nf4_bytes / 2**20:.2f} MiB NF4 ({self.fp32_bytes / max(self.nf4_bytes, 1):.2f}x less)")
        if self.logits_max_abs_error is not None:
            line += (f"; logits vs fp32: max |Δ| {self.logits_max_abs_error:.4f}, "
                     f"relative {self.logits_rel_error:.4f}")
        if self.skipped:
            line += f"; kept in fp32 (input width not a multiple of {NF4_BLOCK}): {len(self.skipped)}"
        return line


def nf4_linear(linear: nn.Linear):
    """An nn.Linear -> a frozen bitsandbytes Linear4bit holding its weight in NF4, computing
    in the weight's dtype. Quantisation happens when the parameter is moved to a device."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                          compute_dtype=w.dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(w.cpu().clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=NF4_BLOCK)
    return q.to(w.device)


def quantize_base(model: nn.Module, targets) -> NF4Report:
    """Replace the targeted linears of `model` (in place) by NF4 ones."""
    report = NF4Report()
    for name in target_names(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if linear.in_features % NF4_BLOCK:
            report.skipped.append(name)
            continue
        q = nf4_linear(linear)
        report.quantized += 1
        report.fp32_bytes += linear.weight.numel() * 4
        report.nf4_bytes += nf4_bytes(q.weight)
        setattr(parent, child, q)
    return report


def nf4_bytes(weight) -> int:
    """Bytes of a quantised Params4bit: the packed codes and the block absmax values."""
    def size(t):
        return t.numel() * t.element_size()
    state = weight.quant_state
    n = size(weight) + size(state.absmax)
    if state.nested:  # double quantisation: 8-bit absmax, their own fp32 scale per 256 blocks
        n += size(state.state2.absmax) + size(state.state2.code) + size(state.offset)
    return n


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w quantised to NF4 and back (fp32), flattened into 64-weight blocks as the base is."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    flat = w.detach().float().flatten().contiguous()
    codes, state = quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4")
    return dequantize_4bit(codes, state).flatten().view_as(w)


@torch.no_grad()
def logits_error(reference: nn.Module, quantized: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """Max |Δlogits| and ||Δlogits|| / ||logits|| of the NF4 base against fp32 on a probe."""
    ref = reference(input_ids).float()
    got = quantized(input_ids).float()
    diff = got - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm().clamp(min=1e-12))
