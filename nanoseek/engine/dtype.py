"""The engine's precision: which dtype the weights and the latent cache take.

`dtype` names the activations' and the weights' dtype, as vLLM's does; the KV cache
follows it (bf16 halves the bytes per token). Two things stay in fp32 whatever it says,
as transformers and DeepSeek keep them: the router (`gate.weight`,
`e_score_correction_bias`: expert choice is a top-k over close scores) and RoPE's
frequencies (positions up to 160K times θ need fp32's mantissa). FP8 weights
(quantization="fp8") are another axis: their codes and scales never change dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoseek.model import CausalLM
from nanoseek.model.moe import Gate
from nanoseek.model.precision import fp32_kept

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
ACCEPTED = ["auto", *DTYPES, *ALIASES]


def resolve_dtype(dtype, checkpoint: Path | None, device: torch.device) -> torch.dtype | None:
    """A torch dtype, or None to keep the model's own (and fp32 for a checkpoint).
    "auto": the checkpoint's `torch_dtype` (config.json), float32 when it names none; on
    CPU float16 becomes float32 (CPUs have no fast fp16 matmul). For a model object, "auto"
    keeps its dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype}: expected one of {ACCEPTED} or torch.float32/bfloat16/float16")
        return dtype
    name = ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name == "auto":
        if checkpoint is None:
            return None
        name = _checkpoint_dtype(checkpoint)
        if name == "float16" and device.type == "cpu":
            name = "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {ACCEPTED}")
    return DTYPES[name]


def _checkpoint_dtype(path: Path) -> str:
    try:
        name = json.loads((path / "config.json").read_text()).get("torch_dtype") or "float32"
    except (OSError, json.JSONDecodeError):
        return "float32"  # the loader names the problem
    return name if name in DTYPES else "float32"


def cast_model(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    """model.to(dtype) in place, keeping the router, RoPE's frequencies and what the model
    marks as fp32 (model/precision.py: V4's mHC, sinks, compressors) in fp32 (FP8Linear
    modules keep their codes and scales by themselves)."""
    keep = [(m, m.weight.data, m.e_score_correction_bias) for m in model.modules() if isinstance(m, Gate)]
    kept = fp32_kept(model)
    fp32 = [(p, p.data) for p in model.parameters() if id(p) in kept]
    rotary = model.rotary.inv_freq if model.rotary is not None else None  # V4 builds its tables per call
    model.to(dtype)
    for gate, weight, bias in keep:
        gate.weight.data = weight.float()
        if bias is not None:
            gate.e_score_correction_bias = bias.float()
    for p, data in fp32:
        p.data = data.float()
    if rotary is not None:
        model.rotary.inv_freq = rotary
    return model


def activation_dtype(model: CausalLM) -> torch.dtype:
    """The dtype the model computes in (its embeddings'): the latent cache's dtype."""
    return model.model.embed_tokens.weight.dtype
