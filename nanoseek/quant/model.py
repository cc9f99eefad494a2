"""FP8 weights in the model, not only in files: swap the projection Linears for FP8Linear.

The same tensors DeepSeek-V3's release stores in FP8 (nanoseek/checkpoint/convert.py): every
Linear of attention (q/kv down- and up-projections, o_proj) and of the FFNs (the dense
MLP, the shared and the routed experts), in the main layers and in the MTP module's block.
V3.2's indexer projections wq_b and wk are FP8 too, as in its release. The router gate,
embeddings, norms, lm_head and MTP's eh_proj stay in high precision, and so
do the projections DeepSeek's V3.2 / V4 releases keep in BF16: the indexers' weights_proj and
V4's compressor projections (kv_proj, gate_proj); V4's grouped o_a_proj (a block-diagonal
Linear subclass) is left as it is.
Each swapped Linear becomes an FP8Linear holding E4M3 codes plus one FP32 scale per
128x128 block, so the weights stay FP8 in memory; inputs are quantised per 1x128 tile on
the fly (DeepSeek-V3 §3.3).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from nanoseek.quant.fp8 import FP8Linear, quantize_weight

log = logging.getLogger(__name__)

# Module names (state-dict style: `model.layers.3.mlp.experts.7.up_proj`, `mtp.0.self_attn.o_proj`).
FP8_MODULE = re.compile(r"(^|\.)(self_attn|mlp)\.((.+\.)?\w+_proj(_with_mqa)?|indexer\.(wq_b|wk))$")
HIGH_PRECISION = re.compile(r"(indexer\.(scorer\.)?weights_proj|compressor\.(indexer\.)?(kv_proj|gate_proj))$")
QUANTIZATIONS = ("fp8",)


def check_quantization(quantization: str | None) -> str | None:
    """None (weights as loaded) or "fp8"; anything else is one clear error."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected None or one of {list(QUANTIZATIONS)}")
    return quantization


def fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, Linear, full name) of every Linear that goes to FP8. Empty Linears
    (a width-0 shared expert) have nothing to scale and stay."""
    out = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            full = f"{name}.{attr}" if name else attr
            if (type(child) is nn.Linear and FP8_MODULE.search(full) and not HIGH_PRECISION.search(full)
                    and child.weight.numel() > 0 and child.bias is None):
                out.append((parent, attr, child, full))
    return out


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the projection Linears by FP8Linear modules (in place; returns the model).
    On the meta device only the structure changes (for loading an FP8 checkpoint's codes
    and scales as they are); otherwise each weight is quantised in 128x128 blocks."""
    for parent, attr, linear, _ in fp8_targets(model):
        w = linear.weight
        if w.device.type == "meta":
            with torch.device("meta"):
                fp8 = FP8Linear(linear.in_features, linear.out_features, backend)
        else:
            fp8 = FP8Linear(linear.in_features, linear.out_features, backend).to(w.device)
            fp8.weight, fp8.weight_scale_inv = quantize_weight(w)
        setattr(parent, attr, fp8)
    return model


def fp8_modules(model: nn.Module) -> list[FP8Linear]:
    return [m for m in model.modules() if isinstance(m, FP8Linear)]


def quantization_backend(model: nn.Module, device: torch.device | str) -> str | None:
    """Which FP8 GEMM the model's FP8Linears run on `device`: "scaled_mm" (FP8 tensor cores
    through torch._scaled_mm), "emulate" (dequantise tiles and blocks, multiply in FP32;
    same numbers up to the order of additions), "scaled_mm+emulate" when some layers
    cannot use the tensor cores (out_features % 16 != 0), or None without FP8 layers."""
    backends = sorted({m.gemm_backend(device) for m in fp8_modules(model)}, reverse=True)
    return "+".join(backends) if backends else None


def log_backend(model: nn.Module, device: torch.device | str) -> str | None:
    """Say once which FP8 path runs, and return it."""
    backend = quantization_backend(model, device)
    if backend is not None:
        log.info("FP8 weights in %d Linears; GEMM: %s on %s", len(fp8_modules(model)), backend,
                 torch.device(device))
    return backend


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what its weights cost in memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
