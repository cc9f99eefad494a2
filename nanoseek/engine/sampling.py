"""Sampling parameters and the per-request sampler.

The knobs carry vLLM's names so a vLLM user can bring their `SamplingParams` over as is.
Order of the filters (as in vLLM): temperature, then top-k, top-p and min-p on the
scaled distribution. Log-probabilities are those of the *raw* model distribution
(log_softmax of the logits, before any filter), which is what vLLM returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    n: int = 1                    # completions per prompt (LLM.generate; sample k uses seed + k)
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 or -1 = off
    top_p: float = 1.0            # nucleus: keep the smallest set with mass >= top_p
    min_p: float = 0.0            # drop tokens with prob < min_p * max prob
    seed: int | None = None       # a torch.Generator per request: same seed, same text
    max_tokens: int = 16
    stop: list[str] | str | None = None        # stop strings (need a tokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # None: none; 0: the sampled token's; n: plus the top n
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n", "must be >= 1"),
            (0 <= self.temperature < float("inf"), "temperature", "must be finite and >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0 (or -1 for off)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device) -> torch.Generator:
    """Per-request RNG, so a seeded request samples the same tokens whatever its batch."""
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def filtered_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (fp32) -> temperature-scaled logits with -inf outside top-k/top-p/min-p."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop = mass_before >= p.top_p           # the best token is always kept
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


@dataclass
class Sample:
    token: int
    logprob: float | None = None                 # raw log-prob of the sampled token
    top_logprobs: dict[int, float] | None = None  # top-n raw log-probs (+ the sampled one)


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> Sample:
    """logits [V] -> one Sample under the request's params."""
    logits = logits.float()
    if p.greedy:
        token = int(logits.argmax())
    else:
        probs = filtered_logits(logits, p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if p.logprobs is None:
        return Sample(token)
    logp = logits.log_softmax(-1)
    top = {}
    if p.logprobs:
        vals, idx = logp.topk(min(p.logprobs, logp.shape[-1]))
        top = dict(zip(idx.tolist(), vals.tolist()))
    top[token] = float(logp[token])
    return Sample(token, float(logp[token]), top)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[Sample]:
    """logits [N, V] -> N samples. Greedy rows without logprobs take one batched argmax."""
    fast = [p.greedy and p.logprobs is None for p in params]
    argmax = logits.argmax(-1).tolist() if any(fast) else None
    return [Sample(argmax[i]) if fast[i] else sample_token(logits[i], params[i], generators[i])
            for i in range(len(params))]
