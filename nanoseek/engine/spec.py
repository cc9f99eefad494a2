"""MTP speculative decoding (DeepSeek-V3 §2.2, "MTP in inference").

The MTP module k=1 sees the main model's final hidden state h_i and the embedding of
token i+1, and predicts token i+2. In a step that drafts, for each position i the main
model just processed (whose next token is now known), the runner runs MTP once: that
fills the MTP layer's own latent cache at i and, at the last position, yields a *draft*
for the token after the pending one. The next step feeds the main model [pending, draft]
at two positions (absorbed decode, S = 2):
  * its sample at the first position is the real next token t1 (from the target
    distribution, exactly as plain decoding would draw it);
  * if t1 == draft, the second position's logits are the right context for the token
    after t1, so a second token is sampled from them: two tokens for one forward;
  * otherwise the draft's cache slot is rolled back (the scheduler's postprocess advances
    num_computed by the tokens sampled, so the slot is overwritten next step).
Because t1 is always drawn from the main model and t2 only from a context the main model
confirmed, the output is the same as plain decoding — greedy or sampled, and with a seed
the same tokens (each request's generator is consumed in the same order). For sampled
requests this acceptance rule (sample == draft) is stricter than speculative rejection
sampling, so it accepts less often, but it never changes the distribution.

The second token is sampled whenever the draft is accepted, even if the first one ends
the request (eos, a stop string): the scheduler's postprocess then drops it. Deciding
that here would need the stop checks and the text, which the scheduler owns; the only
cost is one wasted draw from a finished request's generator.

A decode's MTP pass reuses the verification forward's hidden states and cache view
(one BatchView per step, no padding copy), and the head runs once over both positions.
The MTP layer attends only from `Sequence.mtp_from` on (spec_policy.py): its cache is
trusted only where this request's own unbroken MTP run wrote it, so a step without MTP,
a prefix-cache hit or a preemption starts a new run instead of reading stale latents.

Everything speculative lives here: the drafts (`draft_decode`, `draft_prefill`), the
verification (`verify`) and the counts (`SpecStats`); the policy (when to draft) is in
spec_policy.py. The runner calls them inside one step; the drafts travel to the
scheduler in each sequence's `SeqOutput`, never back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.engine.sampler import Sample, sample_batch
from nanoseek.engine.sequence import Sequence
from nanoseek.engine.spec_policy import SpecPolicy


@dataclass
class SpecStats:
    drafted: int = 0    # drafts verified by the main model
    accepted: int = 0   # drafts the main model agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4)}


class MTPSpeculator:
    """MTP module 0 as the draft model, the main model as the verifier."""

    def __init__(self, runner, policy: SpecPolicy | None = None):
        self.runner = runner  # the ModelRunner whose forwards this drafts for
        self.stats = SpecStats()
        self.policy = policy or SpecPolicy()

    def verify(self, seqs: list[Sequence], logits: torch.Tensor, samples: list[list[Sample]]) -> None:
        """After a decode forward over [pending, draft] (logits [B, S, V]): each sequence
        whose first sample equals its draft gets a second sample, from the draft position's
        logits."""
        accepted, drafted = [], self.stats.drafted
        for b, seq in enumerate(seqs):
            if seq.draft is None or samples[b][0].error is not None:
                continue
            self.stats.drafted += 1
            if samples[b][0].token == seq.draft:
                self.stats.accepted += 1
                accepted.append(b)
        self.policy.observe(self.stats.drafted - drafted, len(accepted))
        if not accepted:
            return
        second = sample_batch(logits[accepted, 1], [seqs[b].params for b in accepted],
                              [seqs[b].generator for b in accepted])
        for b, smp in zip(accepted, second):
            if smp.error is None:  # a non-finite second row: keep the first token only (a reject)
                samples[b].append(smp)

    def draft_decode(self, seqs: list[Sequence], starts: list[int], samples: list[list[Sample]],
                     h: torch.Tensor, view) -> tuple[list[int | None], list[int | None]]:
        """MTP over every row of a decode forward, reusing its hidden states h [B, S, D] and
        its cache view: a row's next token is its sample; a rejected draft's row gets a
        junk one (its latent lands in the rolled-back slot, which the next step rewrites).
        Each sequence's draft comes from its last sampled row. Returns (drafts, mtp_from)."""
        S = h.shape[1]
        next_ids = [[max(t.token, 0) for t in smp] + [0] * (S - len(smp)) for smp in samples]
        first = [st if s.mtp_from is None else s.mtp_from for s, st in zip(seqs, starts)]
        if any(first):
            view = view.keys_from(first)
        logits = self.runner.mtp(h, next_ids, view, [len(smp) - 1 for smp in samples])
        ok = [smp[0].error is None for smp in samples]  # (a failed request drafts nothing)
        return ([d if k else None for d, k in zip(logits.argmax(-1).tolist(), ok)],
                [f if k else None for f, k in zip(first, ok)])

    def draft_prefill(self, seqs: list[Sequence], starts: list[int], chunks: list[int],
                      samples: list[list[Sample]], h: torch.Tensor) -> tuple[list[int | None], list[int | None]]:
        """MTP over the last `prefill_window` positions of each prompt whose last chunk just
        ran (the positions whose next token is now known), starting a new MTP run there;
        a chunk that samples nothing runs no MTP. Returns (drafts, mtp_from)."""
        W = self.policy.prefill_window
        rows, h_prev, next_ids, first = [], [], [], []
        for b, (seq, st, n, smp) in enumerate(zip(seqs, starts, chunks, samples)):
            if not smp or smp[0].error is not None:
                continue
            lo = max(st, st + n - W)
            rows.append(b)
            h_prev.append(h[b, lo - st:n])
            next_ids.append(seq.tokens(lo + 1, st + n) + [smp[0].token])
            first.append(lo)
        drafts: list[int | None] = [None] * len(seqs)
        mtp_from: list[int | None] = [None] * len(seqs)
        if not rows:
            return drafts, mtp_from
        S = max(len(r) for r in next_ids)
        h_pad = h.new_zeros(len(rows), S, *h.shape[2:])
        for i, x in enumerate(h_prev):
            h_pad[i, :len(x)] = x
        view = self.runner.mtp_view([seqs[b].block_table for b in rows], [seqs[b].window_table for b in rows],
                                    first, [len(r) for r in next_ids])
        logits = self.runner.mtp(h_pad, [r + [0] * (S - len(r)) for r in next_ids], view,
                                 [len(r) - 1 for r in next_ids])
        for b, lo, d in zip(rows, first, logits.argmax(-1).tolist()):
            drafts[b], mtp_from[b] = d, lo
        return drafts, mtp_from
