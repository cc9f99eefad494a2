"""QLoRA's frozen base: the targeted linears stored in 4-bit NormalFloat (NF4) through
bitsandbytes, the LoRA adapters (lora.py) trained in full precision on top.

NF4 (Dettmers et al., 2023): each block of 64 consecutive weights is scaled by its absmax a
into [-1, 1] and every weight is stored as the index of the nearest of 16 levels (the
quantiles of a normal distribution, 0 and ±1 exact), 4 bits each. Double quantisation
(bitsandbytes' default, used here) then stores the block absmax values themselves in 8
bits: bitsandbytes subtracts their mean m over the whole tensor and quantises a - m in
groups of 256 blocks, each group scaled by its own fp32 s2 = max |a_j - m| onto the signed
dynamic 8-bit code. Storage: 4 bits a weight + 8 bits per 64 weights + 4 bytes per 16,384
weights, about 4.13 bits against 32 (7.75x less).

The error bound of a stored weight. The 4-bit code c is chosen with the exact absmax a, but
dequantisation multiplies it by the stored â = m + s2·code8, so

    |w - ŵ| = |w - c·a + c·(a - â)| <= (g/2)·a + |c|·|a - â| <= (g/2)·a + h·s2

with g/2 = 0.15190 half the widest gap between NF4 levels (between -1 and -0.69619;
`NF4_MAX_REL_ERROR`), |c| <= 1, and h the 8-bit code's error relative to s2: half its widest
gap is 0.0070313 (its linear steps of 0.9/64 between 0.1 and 1, and -1's distance to its
most negative level, -0.99297), but bitsandbytes' CPU quantiser (an approximate binary
search, then one neighbour compared) sometimes keeps the farther level of a value within
about 1.5e-5 of a midpoint: measured on bitsandbytes 0.50.2's CPU kernel over every float32
within 40,000 ulps of each midpoint, the worst is 0.0070463, so h = 0.00705
(`ABSMAX_CODE_HALF_GAP`; the NF4 step, swept the same way, is exactly nearest). â can be
above or below a. s2 is set by the other blocks of the group, not by a (s2 <= the tensor's
largest block absmax), so a block of small weights beside large ones (heavy tails) can err
by far more than 0.1519·a. `nf4_error_bound` computes the bound per weight from the stored
state; tests/test_qlora.py checks it on the stored base (tiny Gaussian, Student-t and
Cauchy weights, several shapes). The CUDA kernels were not measured here.

Which linears: those LoRA targets whose input width is a multiple of the 64-weight block.
bitsandbytes 0.50's CPU kernel dequantises a 2-D weight row by row, so a row that does not
fill whole blocks comes back wrong (measured: errors of 2.0 on N(0,1) weights shaped
[96, 48]); such linears stay in fp32 and are listed. Every DeepSeek size (and `tiny`'s) is a
multiple of 64.

bitsandbytes' CPU inference shortcut is off (`nf4_linear`): on a CPU with AVX512-BF16 its
Linear4bit repacks the weight at the first eval-mode no-grad forward, computing in bf16
from then on, with no gradient through the base (after it, training silently lost every
gradient through the frozen linears: measured), and failing on an output width that is not
a multiple of 32.

Merging. The adapters are peft's 4-bit LoRA layer (`lora.mark_4bit`), so peft's
`merge_and_unload()` works on the model in memory: it dequantises Ŵ, adds (α/r) B A and
quantises to NF4 again (a 4-bit model; each merged weight within `nf4_error_bound` of
Ŵ + B A). `merge_dequantized` returns Ŵ + B A in full precision instead: the function the
adapters were trained in, as a plain model. `merge_lora` (lora.py, `nanoseek merge-lora`)
folds a QLoRA adapter into the fp32 weights W the base was quantised from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.train.posttrain.lora import target_names

NF4_BLOCK = 64
ABSMAX_BLOCK = 256  # double quantisation: block absmax values per 8-bit group (one fp32 s2 each)
# half the widest gap between NF4 levels, (1 - 0.6961928) / 2 = 0.1519036, rounded up
NF4_MAX_REL_ERROR = 0.15191
# the 8-bit absmax code's worst error relative to its scale s2: half its widest gap is
# 0.0070313, bitsandbytes' CPU quantiser reaches 0.0070463 (measured), rounded up
ABSMAX_CODE_HALF_GAP = 0.00705


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
    """An nn.Linear -> a frozen bitsandbytes Linear4bit holding its weight in NF4 with
    double-quantised absmax, computing in the weight's dtype. Quantisation happens when the
    parameter is moved to a device. The CPU bf16 repacking shortcut is off (module
    docstring): the weight stays as stored, and gradients flow through it in every mode."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                          compute_dtype=w.dtype, quant_type="nf4", device="meta")
    q.support_avx512bf16_for_cpu = False
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


def dequantized(weight) -> torch.Tensor:
    """A stored Params4bit back in its original shape and dtype: what the base computes with."""
    from bitsandbytes.functional import dequantize_4bit
    return dequantize_4bit(weight.data, weight.quant_state)


def nf4_error_bound(w: torch.Tensor, state) -> torch.Tensor:
    """Per weight of w, the most |w - ŵ| can be once w is stored under `state` (see the
    module docstring): (g/2)·a + h·s2 with a the weight's 64-block absmax and s2 the fp32
    scale of its group of 256 block absmax values (double quantisation; without it the
    absmax is kept in fp32 and the bound is (g/2)·a), plus the float rounding of the
    dequantisation's few multiply-adds in w's dtype."""
    blocks = w.detach().float().flatten().view(-1, NF4_BLOCK)
    a = blocks.abs().amax(dim=1)
    bound = NF4_MAX_REL_ERROR * a
    scale = a
    if state.nested:
        s2 = state.state2.absmax.float().repeat_interleave(ABSMAX_BLOCK)[:a.numel()]
        bound = bound + ABSMAX_CODE_HALF_GAP * s2
        scale = a + s2 + state.offset.float().abs()
    bound = bound + 4 * torch.finfo(w.dtype).eps * scale
    return bound[:, None].expand_as(blocks).reshape(w.shape)


@torch.no_grad()
def logits_error(reference: nn.Module, quantized: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """Max |Δlogits| and ||Δlogits|| / ||logits|| of the NF4 base against fp32 on a probe."""
    ref = reference(input_ids).float()
    got = quantized(input_ids).float()
    diff = got - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm().clamp(min=1e-12))


def merge_dequantized(peft_model) -> nn.Module:
    """The QLoRA adapter model as a plain model in full precision: every 4-bit linear
    becomes an nn.Linear holding its dequantised weight plus its adapters' scaled B A
    (Ŵ + (α/r) B A), so the result computes what the adapter model computed (to float
    rounding) and loads, saves and decodes (MLA's absorption included) as any checkpoint.
    peft's own `merge_and_unload()` keeps the base in 4 bits instead: it adds B A to Ŵ and
    quantises again, which moves every weight by up to `nf4_error_bound` once more.
    `peft_model` is changed in place (as merge_and_unload does) and should not be used after."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear4bit):
            if module.merged or module.lora_variant:
                raise ValueError(f"{name}: merge_dequantized takes unmerged plain LoRA adapters")
            base = module.get_base_layer()
            weight = dequantized(base.weight)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            _replace(model, name, _plain_linear(weight, base.bias))
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):  # unwrapped
            _replace(model, name, _plain_linear(dequantized(module.weight), module.bias))
    merged = peft_model.merge_and_unload()  # plain LoRA layers left (linears kept in fp32)
    if hasattr(merged, "is_loaded_in_4bit"):
        del merged.is_loaded_in_4bit
    return merged


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _plain_linear(weight: torch.Tensor, bias) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)
