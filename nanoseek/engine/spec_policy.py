"""When MTP drafting pays: a per-step decision, so speculation steps aside where it costs.

A speculative step costs more than a plain one: the main model runs 2 tokens per request
(more distinct experts, larger matmuls) and the MTP block runs after it. It yields 1 + a
tokens per request, a = acceptance. Measured on the 2-core CPU (one thread, the
benchmark's 3-layer byte model, CPU time per decode step, median of 100, load average
~4; docs/engine.md): a drafting step costs 1.61x a plain one at 1 request,
1.65 at 2, 1.66 at 4 and 8, 1.73 at 16, 1.78 at 32, 1.90 at 64. So drafting pays only
above an acceptance of ~0.6-0.7 up to 16 requests (a ≈ 0.8-0.85 gains 1.04-1.15x
there) and needs ~0.9 at 64. Most of the extra is the MTP block itself (~1.1 of a
~2.5 ms plain step at one request): one more MoE layer beside the model's three, which
in DeepSeek-V3 (61 layers) would be under 2 %.

Three rules, as vLLM (`speculative_disable_by_batch_size`) and SGLang step aside:
  * batch size: a step drafts only while the engine's load (`Scheduler.load`: the requests
    it holds, running and waiting, capped at max_num_seqs) is at most `max_batch`. The
    load, not the step's batch, so that a burst of arrivals stops drafting at once rather
    than after its prompts were prefilled with MTP;
  * acceptance: once `warmup` drafts were verified, a recent acceptance below
    `min_acceptance` (the break-even: cost ratio - 1) pauses drafting for `pause` steps;
    a pause that follows a failed re-probe lasts twice as long, so a checkpoint whose MTP
    never agrees (untrained) costs less and less;
  * holes: a step without MTP leaves the MTP layer's cache without latents at the positions
    it computed. A request resumes drafting with its MTP context starting afresh:
    `Sequence.mtp_from` is the first position of the unbroken run of MTP latents and the
    MTP layer attends only from there (`BatchView.keys_from`). The MTP block leans on the
    main model's hidden state h_i, which carries the whole context, so a short MTP context
    costs little acceptance (one stream: 0.809 with the run starting at a prompt's last
    position, 0.815 at its last 8, 0.791 over the whole prompt). So a prompt needs MTP only over its last `prefill_window`
    positions (its first draft), never over a whole prompt, and a prefix-cache hit or a
    preemption simply starts a new run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecPolicy:
    max_batch: int = 16            # draft only while the engine's load is at most this many requests
    min_acceptance: float = 0.6    # below this recent acceptance drafting cannot pay (cost ratio - 1)
    warmup: int = 32               # drafts verified before acceptance may pause drafting
    decay: float = 0.98            # per-step decay of the acceptance counts (a moving window)
    pause: int = 256               # steps without drafting after acceptance fell below min_acceptance
    max_pause: int = 16384         # the longest pause (each failed re-probe doubles it)
    prefill_window: int = 8        # a prompt's last positions that MTP runs over
    drafted: float = 0.0
    accepted: float = 0.0
    seen: int = 0                  # drafts verified since drafting (re)started
    paused_for: int = 0            # steps left in the current pause
    next_pause: int = 0            # length of the next pause (0: pause)
    reason: str | None = None      # why drafting was last paused

    def should_draft(self, load: int) -> bool:
        """Whether this step runs MTP (and so drafts for the next), the engine holding
        `load` requests."""
        if self.paused_for > 0:
            self.paused_for -= 1
            if self.paused_for == 0:
                self.drafted = self.accepted = self.seen = 0  # re-probe with fresh counts
            return False
        return load <= self.max_batch

    @property
    def paused(self) -> bool:
        return self.paused_for > 0

    def observe(self, drafted: int, accepted: int) -> None:
        """A step's verification counts; pauses drafting if recent acceptance cannot pay."""
        if not drafted or self.paused_for:  # (drafts made before a pause are still verified)
            return
        self.drafted = self.drafted * self.decay + drafted
        self.accepted = self.accepted * self.decay + accepted
        self.seen += drafted
        if self.seen < self.warmup:
            return
        rate = self.accepted / self.drafted
        if rate >= self.min_acceptance:
            self.next_pause = 0  # a probe that pays: the next pause starts short again
            return
        self.paused_for = self.next_pause or self.pause
        self.next_pause = min(2 * self.paused_for, self.max_pause)
        self.reason = (f"recent MTP acceptance {rate:.2f} < {self.min_acceptance}: drafting paused "
                       f"for {self.paused_for} steps")
