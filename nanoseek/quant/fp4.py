"""FP4 (E2M1) weights with per-32 UE8M0 scales, as DeepSeek-V4 releases its routed experts.

DeepSeek-V4-Flash (`expert_dtype: "fp4"`) stores every routed expert's w1/w2/w3 as packed
E2M1 codes, two per byte, `[out, in / 2]` (int8, or torch.float4_e2m1fn_x2), beside
`<name>.scale`: one power of two per 32 consecutive input elements of a row, `[out, in / 32]`
in UE8M0 (float8_e8m0fnu). This is the OCP MX layout (MXFP4): each group g of 32 is

    w_i = E2M1(c_i) * 2^(e_g - 127),   E2M1 in {±0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}

with c_{2j} in the byte's low nibble and c_{2j+1} in its high one (DeepSeek's
inference/convert.py unpacks `x & 0x0F` then `x >> 4`). A code times a power of two is exact
in fp32, so dequantisation loses nothing.
"""

from __future__ import annotations

import torch

from nanoseek.quant.fp8 import E8M0, ue8m0_scale

FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)  # torch >= 2.8
PACKED_DTYPES = tuple(d for d in (torch.int8, FP4_X2) if d is not None)
GROUP = 32  # elements per UE8M0 scale along the input dimension
FP4_MAX = 6.0
# E2M1 code -> value: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is
# subnormal (0 or 0.5).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def check_fp4_layout(codes: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError (one line) unless `codes` are packed E2M1 [M, N/2] and `scale` one UE8M0
    (or float) per 32 of each row's N."""
    if codes.dtype not in PACKED_DTYPES or codes.ndim != 2:
        raise ValueError(f"packed FP4 codes must be a 2-D {' or '.join(map(str, PACKED_DTYPES))} "
                         f"tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    M, N = codes.shape[0], 2 * codes.shape[1]
    want = (M, -(-N // GROUP))
    if not scale.is_floating_point() or tuple(scale.shape) != want:
        raise ValueError(f"FP4 scales must be float8_e8m0fnu of shape {list(want)} (one per {GROUP} "
                         f"of a [{M}, {N}] weight's rows), got {scale.dtype} {list(scale.shape)}")


def unpack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Packed [M, N/2] -> E2M1 values [M, N] fp32 (low nibble first)."""
    b = codes.contiguous().view(torch.uint8)
    nibbles = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).long()
    return torch.tensor(E2M1, dtype=torch.float32, device=codes.device)[nibbles]


def dequantize_fp4(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = E2M1(code) * scale of its group of 32, exactly (fp32 holds every product)."""
    check_fp4_layout(codes, scale)
    values = unpack_fp4(codes)
    per_elem = scale.float().repeat_interleave(GROUP, dim=1)[:, :values.shape[1]]
    return (values * per_elem).to(dtype)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each value, ties to the even code (round half to even, as a
    cast does), saturating at ±6."""
    grid = torch.tensor(E2M1[:8], dtype=torch.float32, device=x.device)
    mid = (grid[1:] + grid[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    mag = x.abs().clamp(max=FP4_MAX)
    code = torch.bucketize(mag, mid)  # a value on a midpoint gets the lower code ...
    tie = (mag == mid[code.clamp(max=6)]) & (code % 2 == 1)
    code = code + tie.long()  # ... unless that one is odd
    return code | ((x < 0) & (code > 0)).long() << 3


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] (N even) -> (packed int8 [M, N/2], float8_e8m0fnu scales [M, ceil(N/32)]):
    DeepSeek-V4's expert format, for writing and for testing the reader."""
    M, N = w.shape
    if N % 2:
        raise ValueError(f"FP4 packs two values per byte: the input dim must be even, got {N}")
    G = -(-N // GROUP)
    groups = torch.nn.functional.pad(w.float(), (0, G * GROUP - N)).view(M, G, GROUP)
    scale = ue8m0_scale(groups.abs().amax(dim=-1), FP4_MAX)
    codes = _e2m1_codes(groups / scale.unsqueeze(-1)).view(M, G * GROUP)[:, :N]
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).view(torch.int8)
    return packed.contiguous(), scale.to(E8M0)
