"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step (1) gives each running sequence in decode one token (two with an MTP draft),
oldest first, so long prompts never stall running decodes; (2) spends what is left of the
token budget on prefill chunks: first the prompts already being prefilled, then new
requests admitted from the waiting queue in arrival order (chunked prefill). A request is
admitted only when blocks for all its current tokens can be had (prefix-cache hits
included); it then never needs a block until it decodes.

When a decode needs a block and none is free, the youngest running request is preempted:
its blocks are freed (they keep their hashes, so its recompute often hits its own prefix)
and it goes back to the head of the waiting queue, keeping the tokens it generated. The
oldest running request is never preempted for a younger one, and `add` rejects requests
that could not fit alone, so every request completes.

After the runner's forward, `postprocess` is the one place a step's results land: it
advances num_computed, appends the sampled tokens (feeding each request's detokeniser),
decides whether a request is done (eos, stop token, stop string, max_tokens, error),
keeps MTP's draft, and registers newly full blocks in the prefix cache or frees a finished
request's blocks. Nothing else in the engine writes a sequence's state.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.sampler import Sample
from nanoseek.engine.sequence import Sequence, SeqOutput, Status


@dataclass
class Batch:
    decodes: list[Sequence] = field(default_factory=list)                 # 1 token (+ draft)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, chunk length)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int] | None = None):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be at least "
                             f"max_num_seqs={max_num_seqs}: every running request decodes each step")
        self.bm = block_manager
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos = set(eos_token_ids or ())
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_token_ids:
            raise ValueError(f"request {seq.request_id}: the prompt is empty")
        P, asked = len(seq.prompt_token_ids), seq.params.max_tokens
        seq.max_tokens = self.max_model_len - P if asked is None else asked  # None: up to the context
        need = P + max(seq.max_tokens, 1)
        if need > self.max_model_len:
            capacity = self.bm.num_blocks * self.bm.block_size
            if self.max_model_len < capacity:
                limit = f"max_model_len ({self.max_model_len} tokens: max_position_embeddings or the configured cap)"
                fix = "shorten the prompt or lower max_tokens"
            else:
                limit = (f"the KV-cache capacity ({self.max_model_len} tokens = {self.bm.num_blocks} blocks x "
                         f"{self.bm.block_size})")
                fix = "shorten the prompt, lower max_tokens or raise kv_cache_memory"
            what = f"max_tokens ({asked})" if asked is not None else "at least 1 new token (max_tokens=None)"
            images = (f", {sum(im.length for im in seq.images)} of them for its {len(seq.images)} image(s)"
                      if seq.images else "")
            raise ValueError(
                f"request {seq.request_id}: prompt ({P} tokens{images}) + {what} = {need} exceeds the longest "
                f"sequence this engine serves, {limit}, by {need - self.max_model_len} tokens; {fix}")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def load(self) -> int:
        """The requests held (running and waiting), capped at max_num_seqs: the batch size
        the next steps will run, which the speculation policy weighs (spec_policy.py)."""
        return min(self.max_num_seqs, len(self.running) + len(self.waiting))

    def finish(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> None:
        """Drop a finished (or now aborted / failed) sequence and free its blocks."""
        if reason is not None:
            seq.finish_reason, seq.error = reason, error
        if seq in self.running:
            self.running.remove(seq)
            if seq.error is None:  # what it computed stays reusable
                self.bm.register_full_blocks(seq)
            else:  # a failed request's latents may be NaN: its blocks hashed so far are forgotten
                self.bm.forget_seq(seq)
            self.bm.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.draft = Status.FINISHED, None
        for im in seq.images:  # the vision features live as long as the request
            im.features = None

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status, seq.num_computed, seq.draft, seq.mtp_from = Status.WAITING, 0, None, None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    # ---------------------------------------------------------------- schedule
    def schedule(self, speculate: bool = False) -> Batch:
        batch, budget = Batch(), self.budget
        for seq in list(self.running):
            if seq.status is Status.RUNNING and seq.in_decode:
                want = 2 if speculate and seq.draft is not None and self._draft_fits(seq) else 1
                if want == 2 and (budget < 2 + len(self.running) or not self.bm.can_grow(seq, seq.num_computed + 2)):
                    want = 1
                if not self._make_room(seq, seq.num_computed + want):
                    continue  # seq itself was the youngest and got preempted
                self.bm.grow(seq, seq.num_computed + want)
                if want == 1:
                    seq.draft = None
                batch.decodes.append(seq)
                budget -= want
        for seq in self.running:
            if not seq.in_decode and budget > 0:
                chunk = min(seq.num_pending, budget)
                self.bm.reserve(seq, seq.num_computed + chunk)
                batch.prefills.append((seq, chunk))
                budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            seq.num_computed = self.bm.allocate(seq)  # the prefix-cache hit
            # after a preemption the hit can cover generated tokens too: count prompt tokens only
            seq.num_cached_prompt_tokens = min(seq.num_computed, len(seq.prompt_token_ids))
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunk = min(seq.num_pending, budget)
            self.bm.reserve(seq, seq.num_computed + chunk)
            batch.prefills.append((seq, chunk))
            budget -= chunk
        return batch

    def _draft_fits(self, seq: Sequence) -> bool:
        """A draft is worth verifying only if the request may still emit two tokens."""
        # then len(seq) + 1 <= prompt + max_tokens <= max_model_len (add() checked): no length check needed
        return len(seq.output_token_ids) + 2 <= seq.max_tokens

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the youngest running requests until seq can hold num_tokens.
        False if seq itself had to go."""
        while not self.bm.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    # ------------------------------------------------------------- postprocess
    def postprocess(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
                    outs: list[SeqOutput]) -> list[Sequence]:
        """Apply one step's results (outs: the decodes', then the prefills', as the runner
        ran them). Returns the sequences that produced a token or finished."""
        touched = []
        computed = [len(o.samples) for o in outs[:len(decodes)]] + [n for _, n in prefills]
        for seq, n, out in zip(decodes + [s for s, _ in prefills], computed, outs):
            if out.error is not None:
                self.finish(seq, "error", out.error)
                touched.append(seq)
                continue
            seq.num_computed += n  # a decode: the pending token, and the draft if it was accepted
            seq.mtp_from = out.mtp_from
            for smp in out.samples:
                self._append(seq, smp)
                if seq.finished:  # e.g. eos on the first of two tokens: the second is dropped
                    break
            seq.draft = out.draft if seq.in_decode and not seq.finished else None
            if seq.finished:
                self.finish(seq)  # registers its full blocks, frees its blocks
            else:
                self.bm.register_full_blocks(seq)
            if out.samples:
                touched.append(seq)
        return touched

    def _append(self, seq: Sequence, smp: Sample) -> None:
        """Add one sampled token and decide whether the request is done."""
        p, detok = seq.params, seq.detokenizer
        seq.output_token_ids.append(smp.token)
        if smp.logprob is not None:
            seq.logprobs.append(smp.top_logprobs)
            seq.cumulative_logprob += smp.logprob
        if (not p.ignore_eos and smp.token in self.eos) or smp.token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", smp.token
            if detok is not None and smp.token not in self.eos:  # eos has no text
                detok.add(smp.token, check_stop=False)
        elif detok is not None and (stop := detok.add(smp.token)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif len(seq.output_token_ids) >= seq.max_tokens:  # add() made prompt + max_tokens <= max_model_len
            seq.finish_reason = "length"
