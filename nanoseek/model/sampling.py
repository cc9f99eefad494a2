"""Turning logits into tokens: temperature, top-k, top-p, min-p, and the draw itself.

One sampler for the package: `CausalLM.generate` and the engine's per-request sampler
(`engine/sampler.py`, which adds vLLM's `SamplingParams` and log-probs) both call these.
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
    u = torch.rand(flat.shape[0], generator=generator, device=flat.device)
    return inverse_cdf(flat, u).view(probs.shape[:-1])


def decode(input_ids: torch.Tensor, logits: torch.Tensor, step, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, eos_token_id: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The token-by-token loop every model's `generate` runs after its prefill: prompts
    [B, S] and the prefill's last logits [B, V] -> [B, S + new]. step(ids [B, 1]) -> the
    next logits [B, V] (the model's forward over its cache). Rows that produced eos keep
    emitting eos; the loop ends early once every row has."""
    out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_logits(logits, temperature, top_k or 0, generator=generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if eos_token_id is not None and bool(done.all()):
            break
        logits = step(nxt[:, None])
    return torch.cat(out, dim=1)


def uniforms(generators: list, device) -> torch.Tensor:
    """One U[0, 1) draw per row, each from its row's generator, so a seeded request's token
    does not depend on the batch it was sampled in."""
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [N, V], u [N] in [0, 1) -> the token whose cumulative-probability interval holds
    u: a draw from each row (as multinomial), batched, from one random number per row (the
    per-row generator calls are what cost; a whole row of noise costs ~100 µs on a CPU).
    The point stays strictly below the row's total, so a zero-probability token (an empty
    interval: the cumulative sum does not move) is never chosen."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    point = torch.minimum(u.float()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
