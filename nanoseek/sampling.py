"""Turning logits into tokens: temperature, top-k, top-p, min-p, and the draw itself.

One sampler for the package: `CausalLM.generate` and the engine's per-request sampler
(`engine/sampling.py`, which adds vLLM's `SamplingParams` and log-probs) both call these.
It lives at the package root because the model may not import the engine. Order of the
filters (as in vLLM): temperature, then top-k, top-p and min-p on the scaled distribution.
"""

from __future__ import annotations

import torch

# Below this temperature the scaled logits overflow fp32 (logits / 1e-30 = inf, softmax NaN):
# sample greedily instead, as vLLM does.
MIN_TEMPERATURE = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """logits [..., V] (fp32) -> temperature-scaled logits with -inf outside top-k/top-p/min-p."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop = mass_before >= top_p             # the best token is always kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...]; greedy (argmax) when temperature is ~0."""
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), temperature, top_k or 0, top_p, min_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
