"""Recomputing the policy's block activations in the backward of an RL update, with the
same bits: each transformer block keeps only its input for the backward and runs again
there (torch.utils.checkpoint, non-reentrant), on the weights and state it read the first time.

Why: an RL update is one large batch (the RL speedrun's: 32 packed rows x ~400 positions),
and what autograd keeps of its forward for the backward (per block: the norms' fp32
inputs, q, k, v, the experts' hidden states, the dispatch gathers) is most of the stage's
peak memory: 0.82 GB of saved tensors for that batch, against one block's share at a time
with recomputation. The price is one more forward of the blocks per update.

Why the same bits: the recomputed forward runs the same operations on the same inputs, so
its tensors are the first forward's, and the backward is the same operations on them.
Two things differ in the second run and are put back: the parameters (inside the
Trainer's bf16 context a block reads bf16 copies, but the backward runs after that context
has restored the fp32 masters: the copies the forward read are installed again), and the
block's own state (a training MoE adds its token counts to `tokens_per_expert` and sets
`aux_loss`; buffers and attributes are restored after the second run, so the load the
router bias update reads is counted once). tests/test_grpo_memory.py checks gradients,
loads and losses against the plain graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def recompute_blocks(blocks):
    """Inside: each of `blocks` (modules called once per forward) keeps only its inputs
    for the backward and recomputes its activations there. Forwards without autograd
    (no_grad, a frozen model) run as usual."""
    patched = []
    try:
        for block in blocks:
            block.forward = functools.partial(_recomputed, block, block.forward)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # the class's forward again


def _recomputed(block: nn.Module, forward, *args, **kwargs):
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in block.parameters()):
        return forward(*args, **kwargs)
    seen = {m: dict(m._parameters) for m in block.modules()}  # what this forward reads
    calls = []

    def run(*a, **kw):
        if not calls:  # the forward itself
            calls.append(1)
            return forward(*a, **kw)
        with _as_first_seen(block, seen):  # the backward's recomputation
            return forward(*a, **kw)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def _as_first_seen(block: nn.Module, seen: dict):
    """Run with the parameters the first forward read; afterwards the block's parameters,
    buffers and attributes are what they were before (the recomputation leaves no trace)."""
    modules = list(block.modules())
    params = {m: dict(m._parameters) for m in modules}
    attrs = {m: {k: v for k, v in vars(m).items() if not k.startswith("_")} for m in modules}
    buffers = [(b, b.clone()) for m in modules for b in m._buffers.values() if b is not None]
    try:
        for m in modules:
            m._parameters.update(seen[m])
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m in modules:
            m._parameters.update(params[m])
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs[m]]:
                delattr(m, k)
            vars(m).update(attrs[m])
