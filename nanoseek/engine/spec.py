"""MTP speculative decoding (DeepSeek-V3 §2.2, "MTP in inference").

The MTP module k=1 sees the main model's final hidden state h_i and the embedding of
token i+1, and predicts token i+2. After every step, for each position i the main model
just processed (whose next token is now known), the engine runs MTP once: that fills the
MTP layer's own latent cache at i and, at the last position, yields a *draft* for the
token after the pending one. The next step feeds the main model [pending, draft] at two
positions (absorbed decode, S = 2):
  * its sample at the first position is the real next token t1 (from the target
    distribution, exactly as plain decoding would draw it);
  * if t1 == draft, the second position's logits are the right context for the token
    after t1, so a second token is sampled from them: two tokens for one forward;
  * otherwise the draft's cache slot is rolled back (num_computed is not advanced, and
    the slot is overwritten next step).
Because t1 is always drawn from the main model and t2 only from a context the main model
confirmed, the output is the same as plain decoding — greedy or sampled, and with a seed
the same tokens (each request's generator is consumed in the same order). For sampled
requests this acceptance rule (sample == draft) is stricter than speculative rejection
sampling, so it accepts less often, but it never changes the distribution.

One caveat worth knowing: with prefix caching, the MTP latent at the last position of a
shared block was computed with the *original* request's next token; drafts can be a
little worse after a hit, outputs are not affected (the main model verifies).
"""

from __future__ import annotations

from dataclasses import dataclass


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
