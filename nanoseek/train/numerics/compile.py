"""`torch.compile` of the training step, block by block, as an option (`TrainConfig.compile`).

What is compiled is each transformer block (the main model's layers and the MTP modules'),
in place (`nn.Module.compile`): the module code is the eager reference and the state dict
keeps its names, so a compiled run saves, resumes and loads exactly like an eager one. The
MoE's dispatch splits tokens by data-dependent counts (`.tolist()`), which breaks the graph
there: attention, the norms and the expert MLPs compile, the routing glue stays eager.

`auto` compiles only where it pays after its compile time. Measured on the 2-core CPU
(tiny preset, 8 x 256 tokens, torch 2.13; docs/training.md): the cold compile costs
about a minute and a compiled step gains under 10 %, so within a 7-minute speedrun it
cannot win back its cold start: `auto` is off on CPU. On CUDA it is not measured here, so
`auto` stays off there too (pass `--compile on`). The cold compile happens inside the first
steps, whose time the loop counts like any step's (inside `--time-limit`); the loop logs it.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.train.config import COMPILE_MODES



def resolve_compile(mode: str, device: torch.device) -> tuple[bool, str]:
    """(compile?, why) for TrainConfig.compile on `device`."""
    if mode == "on":
        return True, "asked for (--compile on)"
    if mode == "off":
        return False, "asked for (--compile off)"
    if mode != "auto":
        raise ValueError(f"training option 'compile': must be one of {COMPILE_MODES}, got {mode!r}")
    if device.type == "cpu":
        return False, ("auto: off on CPU (measured: ~1 min cold compile for under 10 % per step, "
                       "which a short run does not win back)")
    return False, f"auto: off on {device.type} (not measured there; pass --compile on to try)"


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks `compile_blocks` compiles: model.model.layers and the MTP modules."""
    blocks = list(getattr(getattr(model, "model", None), "layers", []))
    return blocks + list(getattr(model, "mtp", []))


def compile_blocks(model: nn.Module, backend: str = "inductor", **options) -> nn.Module:
    """Compile every block of `model` in place; returns `model`. Shapes are left to torch's
    automatic dynamic shapes: the batch is fixed, but each expert's slice of tokens changes
    size every step, and static shapes would recompile for each new size."""
    blocks = compiled_blocks(model)
    if not blocks:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no model.layers or mtp blocks to compile")
    for block in blocks:
        block.compile(backend=backend, **options)
    return model
