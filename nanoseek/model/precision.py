"""Which parameters stay fp32 whatever dtype the model computes in, as DeepSeek keeps them.

A module marks them itself: `runs_in_fp32 = True` keeps all its own parameters (the MoE
router, V4's hyper-connections), and `fp32_parameters` names some of them (V4's attention
sinks; its compressors' projections, position biases and norms). bf16 training
(train/numerics/bf16_weights.py) leaves these as the fp32 masters, and the engine's cast to
bf16 (engine/dtype.py) casts them back.
"""

from __future__ import annotations

from torch import nn


def fp32_kept(model: nn.Module) -> set[int]:
    """ids of the parameters kept in fp32: every own parameter of a module with
    `runs_in_fp32 = True`, and each one a module names in `fp32_parameters`."""
    kept = set()
    for module in model.modules():
        if getattr(module, "runs_in_fp32", False):
            kept.update(id(p) for p in module.parameters(recurse=False))
        kept.update(id(module.get_parameter(n)) for n in getattr(module, "fp32_parameters", ()))
    return kept
