"""MTP speculative decoding (DeepSeek-V3 §2.2, "MTP in inference").

The MTP module k=1 sees the main model's final hidden state h_i and the embedding of
token i+1, and predicts token i+2. After every step, for each position i the main model
just processed (whose next token is now known), the runner runs MTP once: that fills the
MTP layer's own latent cache at i and, at the last position, yields a *draft* for the
token after the pending one. The next step feeds the main model [pending, draft] at two
positions (absorbed decode, S = 2):
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
cost is one wasted draw from a finished request's generator. MTP then also runs over the
accepted draft's position, so a finished request's cached blocks carry MTP latents for
every position it computed.

Everything speculative lives here: the draft (`MTPSpeculator.draft`), the verification
(`MTPSpeculator.verify`) and the counts (`SpecStats`). The runner calls both inside one
step; the drafts travel to the scheduler in each sequence's `SeqOutput`, never back.

One caveat worth knowing: with prefix caching, the MTP latent at the last position of a
shared block was computed with the *original* request's next token; drafts can be a
little worse after a hit, outputs are not affected (the main model verifies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.engine.sampling import Sample, sample_batch
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

    def verify(self, seqs: list[Sequence], h: torch.Tensor, samples: list[list[Sample]]) -> None:
        """After a decode forward over [pending, draft]: each sequence whose first sample
        equals its draft gets a second sample, from the draft position's logits (h[b, 1])."""
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
        second = sample_batch(self.runner.logits(h[accepted, 1]), [seqs[b].params for b in accepted],
                              [seqs[b].generator for b in accepted])
        for b, smp in zip(accepted, second):
            if smp.error is None:  # a non-finite second row: keep the first token only (a reject)
                samples[b].append(smp)

    def draft(self, seqs: list[Sequence], starts: list[int], samples: list[list[Sample]], h: torch.Tensor,
              num_computed: list[int], absorb: bool, active: bool = True) -> list[int | None]:
        """Run MTP over the positions each sequence just computed whose next token is now
        known (it fills the MTP layer's cache there); the last one's guess is the sequence's
        draft. num_computed[b]: positions from starts[b] this forward made real. Only when
        the policy let this step draft (`active`), and only for sequences whose MTP cache
        is whole (spec_policy.py); the others get None and run no MTP."""
        rows, h_prev, next_ids = [], [], []
        for b, (seq, st, smp) in enumerate(zip(seqs, starts, samples)):
            if not active or not seq.mtp_whole or (smp and smp[0].error is not None):
                continue  # (a failed request drafts nothing)
            new = [s.token for s in smp]
            n = min(num_computed[b], len(seq) + len(new) - 1 - st)  # rows with a known next token
            known = seq.tokens(st + 1, min(st + 1 + n, len(seq)))
            rows.append(b)
            h_prev.append(h[b, :n])
            next_ids.append(known + new[:n - len(known)])
        drafts: list[int | None] = [None] * len(seqs)
        if rows:
            logits = self.runner.mtp(h_prev, next_ids, [starts[b] for b in rows],
                                     [seqs[b].block_table for b in rows], absorb)
            for b, d in zip(rows, logits.argmax(-1).tolist()):
                drafts[b] = d
        return drafts
