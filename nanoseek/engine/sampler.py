"""Sampling parameters and the per-request sampler.

The knobs carry vLLM's names so a vLLM user can bring their `SamplingParams` over as is.
The filters and the draw are `nanoseek.model.sampling`'s (the one sampler, shared with
`CausalLM.generate`). Log-probabilities are those of the *raw* model distribution
(log_softmax of the logits, before any filter), which is what vLLM returns by default.
A row of non-finite logits (NaN/inf: broken weights, an overflow) is not sampled: its
request fails with an error naming them, and the rest of the batch carries on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from nanoseek.model.sampling import filter_logits, inverse_cdf, is_greedy, uniforms


MAX_STOPS, MAX_STOP_CHARS = 64, 4096


@dataclass
class SamplingParams:
    n: int = 1                    # completions per prompt (LLM.generate; sample k uses seed + k)
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 or -1 = off
    top_p: float = 1.0            # nucleus: keep the smallest set with mass >= top_p
    min_p: float = 0.0            # drop tokens with prob < min_p * max prob
    seed: int | None = None       # a torch.Generator per request: same seed, same text
    max_tokens: int | None = 16   # None: up to the context (max_model_len - prompt), as in vLLM
    stop: list[str] | str | None = None        # stop strings (need a tokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # None: none; 0: the sampled token's; n: plus the top n
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # False: the text keeps special tokens (e.g. DeepSeek's tool-call markers)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SamplingParams.{name}={value!r} must be a finite number")
        checks = [
            (self.n >= 1, "n", "must be >= 1"),
            (0 <= self.temperature < float("inf"), "temperature", "must be finite and >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0 (or -1 for off)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens", "must be an integer >= 1, or None (up to the context)"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            # the detokeniser checks every stop string's prefixes against the text's tail at
            # each token, in time quadratic in a stop string's length
            (len(self.stop) <= MAX_STOPS and all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
             f"must be at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def for_sample(self, k: int) -> "SamplingParams":
        """The k-th of n samples as a request of its own: its own seed (seed + k), so the n
        completions differ but stay reproducible (`LLM.generate` and the server's `n`)."""
        if self.n == 1:
            return self
        return replace(self, n=1, seed=None if self.seed is None else self.seed + k)


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
    return filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)


@dataclass
class Sample:
    token: int
    logprob: float | None = None                 # raw log-prob of the sampled token
    top_logprobs: dict[int, float] | None = None  # top-n raw log-probs (+ the sampled one)
    error: str | None = None                     # set (and token -1) when the logits were not finite


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> Sample:
    """logits [V] -> one Sample under the request's params."""
    return sample_batch(logits[None], [p], [generator])[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[Sample]:
    """logits [N, V] -> N samples, batched: one argmax for the greedy rows, one filter and
    softmax per distinct (temperature, top_k, top_p, min_p), one inverse-CDF draw
    (nanoseek.model.sampling.inverse_cdf) from one uniform per row by its own generator, one log_softmax
    for the rows that want log-probs. A row with a NaN or inf logit gets an error Sample."""
    finite = finite_rows(logits)
    rows = [i for i in range(len(params)) if finite[i]]
    tokens = [-1] * len(params)
    greedy = [i for i in rows if params[i].greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        if not params[i].greedy:
            p = params[i]
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
    for (temperature, top_k, top_p, min_p), idx in groups.items():
        probs = filter_logits(logits[idx].float(), temperature, top_k, top_p, min_p).softmax(-1)
        u = uniforms([generators[i] for i in idx], probs.device)
        for i, t in zip(idx, inverse_cdf(probs, u).tolist()):
            tokens[i] = t
    samples = [Sample(tokens[i]) if finite[i] else Sample(-1, error=non_finite_error(logits[i]))
               for i in range(len(params))]
    want = [i for i in rows if params[i].logprobs is not None]
    if want:
        add_logprobs(samples, logits[want].float().log_softmax(-1), [params[i] for i in want], want)
    return samples


def add_logprobs(samples: list[Sample], logp: torch.Tensor, params: list[SamplingParams],
                 idx: list[int]) -> None:
    """Raw log-probs [len(idx), V] onto samples[idx]: the sampled token's, and the top n."""
    chosen = logp.gather(1, torch.tensor([samples[i].token for i in idx], device=logp.device)[:, None])
    n = max(p.logprobs for p in params)
    top_vals, top_idx = logp.topk(min(n, logp.shape[-1]), dim=-1) if n else (None, None)
    for j, (i, p) in enumerate(zip(idx, params)):
        s = samples[i]
        top = {}
        if p.logprobs:
            top = dict(zip(top_idx[j, :p.logprobs].tolist(), top_vals[j, :p.logprobs].tolist()))
        s.logprob = float(chosen[j, 0])
        top[s.token] = s.logprob
        s.top_logprobs = top


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Which rows of [N, V] are all finite. A NaN or inf makes its row's sum non-finite, so
    only rows whose sum is not finite (or overflowed) are checked element by element: a full
    isfinite pass cost more than the draw itself."""
    sums = logits.float().sum(-1)
    finite = torch.isfinite(sums)
    if not bool(finite.all()):
        suspect = (~finite).nonzero().flatten()
        finite[suspect] = torch.isfinite(logits[suspect]).all(-1)
    return finite.tolist()


def non_finite_error(row: torch.Tensor) -> str:
    nan, inf = int(row.isnan().sum()), int(row.isinf().sum())
    return (f"non-finite logits: {nan} NaN and {inf} inf of {row.numel()} "
            "(the model's weights or activations overflowed); the request was stopped")
