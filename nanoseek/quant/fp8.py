"""Block-wise FP8 (E4M3) quantisation in the DeepSeek-V3 checkpoint layout.

Weights are quantised per 128x128 block: each block gets one FP32 scale, and the
checkpoint stores its inverse as `<name>_scale_inv` of shape [ceil(M/128), ceil(N/128)],
so that  weight ≈ fp8_weight.float() * scale_inv  block by block.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Pad a 2-D tensor to whole blocks and view it as [Mb, block, Nb, block]."""
    M, N = x.shape
    Mb, Nb = -(-M // block), -(-N // block)
    padded = x.new_zeros(Mb * block, Nb * block)
    padded[:M, :N] = x
    return padded.view(Mb, block, Nb, block), M, N


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M,N] -> (fp8 weight [M,N], scale_inv [Mb,Nb] fp32) with per-block absmax scaling."""
    blocks, M, N = _blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [Mb, Nb]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(blocks.shape[0] * block, -1)[:M, :N].contiguous(), scale_inv


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = BLOCK) -> torch.Tensor:
    """fp8 [M,N] and scale_inv [Mb,Nb] -> weight [M,N] in `dtype`."""
    M, N = q.shape
    Mb, Nb = -(-M // block), -(-N // block)
    if tuple(scale_inv.shape) != (Mb, Nb):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}; a [{M}, {N}] weight in "
                         f"{block}x{block} blocks needs [{Mb}, {Nb}]")
    scale = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (q.float() * scale).to(dtype)
