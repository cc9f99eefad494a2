"""Block-wise FP8 (E4M3) quantisation in the DeepSeek-V3 checkpoint layout.

Weights are quantised per 128x128 block: each block gets one FP32 scale, and the
checkpoint stores its inverse as `<name>_scale_inv` of shape [ceil(M/128), ceil(N/128)],
so that  weight ≈ fp8_weight.float() * scale_inv  block by block.

DeepSeek-V3.1/V3.2 (`scale_fmt: "ue8m0"`) round each block scale up to a power of two, still
stored as FP32; DeepSeek-V4 stores the same blocks' scales as UE8M0 bytes (float8_e8m0fnu,
2^(e-127)) under `<name>.scale`. A power of two times an E4M3 code is exact in FP32, so
`dequantize_weight` reads all three alike.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
# What a checkpoint may store beside a `weight_scale_inv` and nanoseek dequantises (same block
# semantics for both: weight = code * scale_inv); nanoseek itself writes E4M3, as DeepSeek does.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128
E8M0 = torch.float8_e8m0fnu  # UE8M0: an unsigned 8-bit exponent, value 2^(e - 127)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Pad a 2-D tensor to whole blocks and view it as [Mb, block, Nb, block]."""
    M, N = x.shape
    Mb, Nb = -(-M // block), -(-N // block)
    padded = x.new_zeros(Mb * block, Nb * block)
    padded[:M, :N] = x
    return padded.view(Mb, block, Nb, block), M, N


def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest power of two s with amax / s <= qmax (DeepSeek's ue8m0 kernels round
    scales up, so nothing clips); an all-zero group gets 1."""
    amax = amax.float()
    s = torch.exp2(torch.ceil(torch.log2(amax / qmax)))
    return torch.where(amax > 0, s, torch.ones_like(s))


def quantize_weight(w: torch.Tensor, block: int = BLOCK,
                    scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M,N] -> (fp8 weight [M,N], scale_inv [Mb,Nb] fp32) with per-block absmax scaling;
    scale_fmt="ue8m0" rounds each scale up to a power of two (V3.1 and later)."""
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    blocks, M, N = _blocks(w.float(), block)
    Mb, Nb = blocks.shape[0], blocks.shape[2]
    # reduce over a contiguous last dim: much faster than amax(dim=(1, 3)) on the strided view
    amax = blocks.permute(0, 2, 1, 3).reshape(Mb, Nb, -1).abs().amax(dim=-1)
    if scale_fmt == "ue8m0":
        scale_inv = ue8m0_scale(amax, FP8_MAX)
    else:
        scale_inv = amax.clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(blocks.shape[0] * block, -1)[:M, :N].contiguous(), scale_inv


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = BLOCK, scale_name: str = "scale_inv") -> torch.Tensor:
    """fp8 [M,N] and scale_inv [Mb,Nb] (FP32, or UE8M0 powers of two) -> weight [M,N] in `dtype`.
    `scale_name` is what a shape error calls the scales: V3's `weight_scale_inv` or V4's `scale`."""
    M, N = q.shape
    Mb, Nb = -(-M // block), -(-N // block)
    if tuple(scale_inv.shape) != (Mb, Nb):
        raise ValueError(f"{scale_name} has shape {tuple(scale_inv.shape)}; a [{M}, {N}] weight in "
                         f"{block}x{block} blocks needs [{Mb}, {Nb}]")
    blocks, _, _ = _blocks(q.float(), block)  # [Mb, block, Nb, block]
    w = (blocks * scale_inv.float()[:, None, :, None]).view(Mb * block, Nb * block)
    return w[:M, :N].to(dtype)


# --------------------------------------------------------------- activations
# DeepSeek-V3 §3.3.1: activations are scaled per 1x128 tile (one token, 128 channels), so an
# outlier only costs precision to the 127 values beside it, not to the whole tensor.
def quantize_activation(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], scale_inv [..., ceil(K/block)] fp32), x ≈ fp8 * scale_inv per tile."""
    K = x.shape[-1]
    Kb = -(-K // block)
    tiles = torch.nn.functional.pad(x.float(), (0, Kb * block - K)).unflatten(-1, (Kb, block))
    scale_inv = tiles.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [..., Kb]
    q = (tiles / scale_inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :K].contiguous(), scale_inv


def dequantize_activation(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                          block: int = BLOCK) -> torch.Tensor:
    K = q.shape[-1]
    scale = scale_inv.float().repeat_interleave(block, dim=-1)[..., :K]
    return (q.float() * scale).to(dtype)


# ---------------------------------------------------------------- the GEMM
def fp8_gemm_emulated(x_q, x_s, w_q, w_s) -> torch.Tensor:
    """y = x @ w.T from FP8 operands, on any device: dequantise each tile/block with its
    scale and multiply in FP32. Equals the quantised GEMM with FP32 accumulation up to the
    order of the additions; this is what the quantisation costs, without FP8 hardware."""
    return dequantize_activation(x_q, x_s) @ dequantize_weight(w_q, w_s).T


def fp8_gemm_scaled_mm(x_q, x_s, w_q, w_s, block: int = BLOCK) -> torch.Tensor:
    """The same GEMM on FP8 tensor cores through `torch._scaled_mm`, DeepSeek's way: each
    128-wide slice of K is one FP8 GEMM whose row scales are the activation tile scales
    and whose column scales are the weight block scales, and the partial sums are
    promoted to and accumulated in FP32 (V3 §3.3.2, "increasing accumulation precision").
    x_q [M, K], x_s [M, Kb], w_q [N, K], w_s [Nb, Kb] -> [M, N] fp32."""
    M, K = x_q.shape
    N = w_q.shape[0]
    Kb = -(-K // block)
    pad_m, pad_k = -M % 16, Kb * block - K  # FP8 GEMMs want dims that are multiples of 16
    a = torch.nn.functional.pad(x_q.view(torch.uint8), (0, pad_k, 0, pad_m)).view(FP8)
    b = torch.nn.functional.pad(w_q.view(torch.uint8), (0, pad_k)).view(FP8)
    sa = torch.nn.functional.pad(x_s.float(), (0, 0, 0, pad_m), value=1.0)  # [M', Kb]
    sb = w_s.float().repeat_interleave(block, dim=0)[:N]  # [N, Kb]
    out = torch.zeros(M + pad_m, N, dtype=torch.float32, device=x_q.device)
    for j in range(Kb):
        cols = slice(j * block, (j + 1) * block)
        out += _scaled_mm(a[:, cols].contiguous(), b[:, cols].contiguous().T,
                          sa[:, j:j + 1].contiguous(), sb[:, j].reshape(1, N).contiguous())
    return out[:M]


_OUT_DTYPE: dict[str, torch.dtype] = {}


def _scaled_mm(a, b, sa, sb) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales, FP32 out where the backend allows it (some
    CUDA builds only write BF16 for row-wise scaling; then the slice is rounded once)."""
    key = a.device.type
    dtype = _OUT_DTYPE.get(key, torch.float32)
    try:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=dtype).float()
    except RuntimeError:
        if dtype != torch.float32:
            raise
        _OUT_DTYPE[key] = torch.bfloat16
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).float()


def has_fp8_gemm(device: torch.device | str) -> bool:
    """CUDA GPUs with FP8 tensor cores (Ada sm_89, Hopper sm_90 and later)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(torch.nn.Module):
    """A bias-free Linear whose weight is stored as DeepSeek-V3 stores it (FP8 + one FP32
    `weight_scale_inv` per 128x128 block) and whose input is quantised per 1x128 tile on
    the fly. backend: "auto" (FP8 tensor cores when the device has them, else emulation),
    "scaled_mm" or "emulate". Output in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "scaled_mm", "emulate"):
            raise ValueError(f"backend must be auto, scaled_mm or emulate, got {backend!r}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale_inv", torch.ones(-(-out_features // BLOCK), -(-in_features // BLOCK)))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, backend: str = "auto") -> "FP8Linear":
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias (DeepSeek's Linears have none)")
        m = cls(linear.in_features, linear.out_features, backend)
        q, s = quantize_weight(linear.weight.detach())
        m.weight, m.weight_scale_inv = q.to(linear.weight.device), s.to(linear.weight.device)
        return m

    def gemm_backend(self, device: torch.device | str) -> str:
        """The GEMM this module runs on `device`: "scaled_mm" or "emulate"."""
        if self.backend != "auto":
            return self.backend
        # cuBLAS FP8 needs N % 16 == 0
        return "scaled_mm" if has_fp8_gemm(device) and self.out_features % 16 == 0 else "emulate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, x_s = quantize_activation(x.reshape(-1, shape[-1]))
        gemm = fp8_gemm_scaled_mm if self.gemm_backend(x.device) == "scaled_mm" else fp8_gemm_emulated
        y = gemm(x_q, x_s, self.weight, self.weight_scale_inv)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the FP8 codes and block scales stand for (a fresh tensor; the module
        keeps its FP8 weight): for code that needs the matrix itself, e.g. MLA's absorption."""
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype)

    def _apply(self, fn, recurse=True):
        """Moves change the device, never the dtype: `model.to(torch.bfloat16)` casts the
        model's activations, while FP8 codes and their FP32 scales stay what they are (a
        cast would turn the codes into BF16 numbers and round the scales)."""
        for name, t in self._buffers.items():
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


# ---------------------------------------------------------------- the error
def quant_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """How far a quantised result is from the reference: relative Frobenius error
    ||a - r|| / ||r||, largest absolute error, and the reference's largest magnitude."""
    r, a = reference.float(), approx.float()
    diff = a - r
    return {"rel_error": (diff.norm() / r.norm().clamp(min=1e-30)).item(),
            "max_abs_error": diff.abs().max().item(), "ref_max_abs": r.abs().max().item()}


def weight_quant_error(w: torch.Tensor, block: int = BLOCK) -> dict[str, float]:
    """Error of a weight's round trip through block-wise FP8."""
    q, s = quantize_weight(w, block)
    return quant_error(w, dequantize_weight(q, s, torch.float32, block))
