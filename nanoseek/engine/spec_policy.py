"""When MTP drafting pays: a per-step decision, so speculation steps aside where it costs.

A speculative step costs more than a plain one: the main model runs 2 tokens per request
(more distinct experts, larger matmuls) and the MTP block runs after it. It yields 1 + a
tokens per request, a = acceptance. Measured on the 2-core CPU (one thread, the benchmark's
3-layer byte model, best of 40; see README "Engine"): a speculative step's cost / a plain
step's was 1.57 at 1 running request, 1.52 at 8, 1.67 at 16, 1.79 at 32, so at a ≈ 0.85 it
gains ~1.2x up to 8-16 requests and nothing beyond. As vLLM
(`speculative_disable_by_batch_size`) and SGLang do, drafting stops above a batch size
(`max_batch`); and it stops for good when the measured acceptance falls below what pays
(`min_acceptance` = the measured cost ratio - 1), e.g. a checkpoint with an untrained MTP.

A step without drafting runs no MTP at all, so the MTP layer's cache gets no latents at the
positions that step computed; drafts from such a cache are poor, so a request drafts only
while its MTP cache is whole (`Sequence.mtp_whole`: every position it computed ran MTP).
Requests admitted into a large batch therefore never draft; the ones served alone always do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecPolicy:
    max_batch: int = 16            # draft only in steps with at most this many requests
    min_acceptance: float = 0.6    # below this (measured cost ratio ~1.6 - 1) drafting cannot pay
    warmup: int = 64               # drafts verified before acceptance may switch drafting off
    decay: float = 0.98            # per-step decay of the acceptance counts (a moving window)
    drafted: float = 0.0
    accepted: float = 0.0
    seen: int = 0
    disabled: str | None = None    # why drafting is off for good, if it is

    def should_draft(self, num_seqs: int) -> bool:
        """Whether this step (num_seqs requests) runs MTP and so drafts for the next."""
        return self.disabled is None and num_seqs <= self.max_batch

    def observe(self, drafted: int, accepted: int) -> None:
        """A step's verification counts; switches drafting off if acceptance cannot pay."""
        if not drafted:
            return
        self.drafted = self.drafted * self.decay + drafted
        self.accepted = self.accepted * self.decay + accepted
        self.seen += drafted
        rate = self.accepted / self.drafted
        if self.seen >= self.warmup and rate < self.min_acceptance and self.disabled is None:
            self.disabled = (f"recent MTP acceptance {rate:.2f} < {self.min_acceptance}: "
                             "drafting costs more than it gains")
