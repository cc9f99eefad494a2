"""What one micro-batch's loss is a share of: the targets of the whole optimizer step.

Under gradient accumulation a step's loss is the sum of per-target losses over every
micro-batch divided by the step's count of targets that count (torchtitan's rule). With
loss masks (assistant-only SFT, GRPO completions) micro-batches hold different numbers of
targets, and averaging each micro-batch's mean would weigh a token of a sparse micro-batch
more than one of a dense micro-batch; the global count weighs every token the same, so
grad_accum × batch_size gives the gradient of one big batch.

A mask is written into the labels (the Hugging Face convention): a target equal to
IGNORE_INDEX (-100) is not predicted and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.model.transformer import IGNORE_INDEX


@dataclass(frozen=True)
class StepTargets:
    """Passed to a stage's loss_fn with each micro-batch. `count`: the step's targets,
    summed over its micro-batches (a device tensor of whatever shape the stage's
    count_targets returns: no host sync); `micro_batches`: how many there are, the divisor
    of terms that are already means over one micro-batch (the MoE balance loss)."""
    count: torch.Tensor
    micro_batches: int


def count_targets(batch: Any) -> torch.Tensor:
    """The default count: labels (batch[1] of an (inputs, labels, ...) batch) that are not
    IGNORE_INDEX."""
    return (batch[1] != IGNORE_INDEX).sum()


def step_targets(batches: list, count=count_targets) -> StepTargets:
    counts = [count(b) for b in batches]
    return StepTargets(torch.stack(counts).sum(dim=0), len(batches))
