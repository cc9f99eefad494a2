"""The engine core: requests in, one scheduler step at a time, tokens out.

`LLMEngine.step()` asks the scheduler for a batch, runs the decodes (absorbed attention,
one forward) and the prefill chunks (decompressed attention, one forward), samples,
checks stop conditions, and — when the model has MTP layers and speculation is on —
drafts the next token with MTP for every sequence that moved. `LLM` (offline) and
`AsyncLLM` (server) are thin loops around it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.cache import PagedLatentCache, budget_bytes
from nanoseek.engine.runner import ModelRunner
from nanoseek.engine.sampling import Sample, SamplingParams, make_generator, sample_batch
from nanoseek.engine.scheduler import Scheduler
from nanoseek.engine.sequence import Sequence
from nanoseek.engine.spec import SpecStats
from nanoseek.model import CausalLM


@dataclass
class EngineConfig:
    kv_cache_memory: str | float | None = None  # bytes (> 1, or '512MiB') or a fraction of free memory;
    #                                             None: 0.9 of free GPU memory, 0.05 of free CPU memory
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512    # token budget of one step (decodes + prefill chunks)
    enable_prefix_caching: bool = True
    speculative: bool | None = None      # None: on when the model has MTP layers
    max_model_len: int | None = None     # default: max_position_embeddings

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)} must be >= 1")


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer=None, config: EngineConfig | None = None, **kw):
        self.config = config = config or EngineConfig(**kw)
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.device = next(model.parameters()).device
        has_mtp = len(model.mtp) > 0
        if config.speculative and not has_mtp:
            raise ValueError("speculative=True needs a checkpoint with MTP layers (num_nextn_predict_layers >= 1)")
        self.speculative = has_mtp if config.speculative is None else config.speculative
        num_layers = cfg.num_hidden_layers + (1 if self.speculative else 0)
        dtype = next(model.parameters()).dtype
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # No point holding more blocks than max_num_seqs full-length sequences can use.
        enough = config.max_num_seqs * -(-max_len // config.block_size) + 1
        budget = budget_bytes(config.kv_cache_memory or (0.9 if self.device.type == "cuda" else 0.05), self.device)
        self.cache = PagedLatentCache.from_budget(cfg, budget, config.block_size, num_layers, dtype, self.device,
                                                  max_blocks=enough)
        self.block_manager = BlockManager(self.cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   min(max_len, self.cache.capacity_tokens))
        self.runner = ModelRunner(model, self.cache)
        self.eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else
                       [] if cfg.eos_token_id is None else [cfg.eos_token_id])
        self.spec_stats = SpecStats()
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer (tokenizer.json): give prompts as token-id lists")
            prompt_text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.model.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, prompt=prompt_text, generator=make_generator(params, self.device))
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's hash. Call after changing the model's weights (e.g.
        between GRPO updates): cached latents were computed by the old weights."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        """Gauges and counters for /metrics and logs."""
        bm, sch = self.block_manager, self.scheduler
        return {"running": len(sch.running), "waiting": len(sch.waiting),
                "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used,
                "kv_cache_usage": bm.num_used / bm.num_blocks, "kv_cache_bytes": self.cache.nbytes,
                "prefix_cache_queries": bm.queries, "prefix_cache_hits": bm.hits,
                "preemptions": sch.num_preemptions, "forwards": self.runner.forwards,
                "spec_drafted": self.spec_stats.drafted, "spec_accepted": self.spec_stats.accepted}

    # ---------------------------------------------------------------------- step
    def step(self) -> list[Sequence]:
        """Run one scheduler step; return the sequences that produced tokens or finished."""
        batch = self.scheduler.schedule(self.speculative)
        if not batch and self.scheduler.has_work():  # cannot happen by construction; never spin
            raise RuntimeError(f"the scheduler cannot make progress: {len(self.scheduler.waiting)} waiting, "
                               f"{self.block_manager.num_free}/{self.block_manager.num_blocks} blocks free")
        touched: list[Sequence] = []
        if batch.decodes:
            touched += self._decode(batch.decodes)
        if batch.prefills:
            touched += self._prefill(batch.prefills)
        for seq in touched:  # only now: MTP has written their last positions' latents too
            if seq.finished:
                self.scheduler.finish(seq)  # registers its full blocks, frees its blocks
                self.requests.pop(seq.request_id, None)
        return touched

    def _prefill(self, items: list[tuple[Sequence, int]]) -> list[Sequence]:
        seqs = [s for s, _ in items]
        starts = [s.num_computed for s in seqs]
        inputs = [s.token_ids[st:st + n] for (s, n), st in zip(items, starts)]
        h = self.runner.forward(inputs, starts, [s.block_table for s in seqs], absorb=False)
        done = []  # (batch row, sequence) of prompts whose last chunk just ran
        for b, (seq, n) in enumerate(items):
            seq.num_computed += n
            if seq.num_computed == len(seq):
                done.append((b, seq))
        if done:
            rows = torch.stack([h[b, items[b][1] - 1] for b, _ in done])
            samples = self._sample([s for _, s in done], self.runner.logits(rows))
            for (_, seq), smp in zip(done, samples):
                self._append(seq, smp)
        self._after_forward([(b, s, st) for b, (s, st) in enumerate(zip(seqs, starts))], h, absorb=False)
        return [s for _, s in done]

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        starts = [s.num_computed for s in seqs]
        inputs = [[s.last_token] + ([s.draft] if s.draft is not None else []) for s in seqs]
        h = self.runner.forward(inputs, starts, [s.block_table for s in seqs], absorb=True)
        first = self._sample(seqs, self.runner.logits(h[:, 0]))
        verify = []
        for b, (seq, smp) in enumerate(zip(seqs, first)):
            seq.num_computed += 1
            self._append(seq, smp)
            if seq.draft is not None:
                self.spec_stats.drafted += 1
                if smp.token == seq.draft:
                    self.spec_stats.accepted += 1
                    seq.num_computed += 1  # the draft's latents become real
                    if not seq.finished:
                        verify.append((b, seq))
            seq.draft = None
        if verify:
            second = self._sample([s for _, s in verify], self.runner.logits(torch.stack([h[b, 1] for b, _ in verify])))
            for (_, seq), smp in zip(verify, second):
                self._append(seq, smp)
        self._after_forward([(b, s, st) for b, (s, st) in enumerate(zip(seqs, starts))], h, absorb=True)
        return seqs

    def _after_forward(self, rows: list[tuple[int, Sequence, int]], h: torch.Tensor, absorb: bool) -> None:
        """Register newly full blocks; with speculation, run MTP over the positions each
        sequence just computed (their next tokens are known now) and keep its draft. MTP
        runs for sequences that just finished too (their blocks are registered in step(),
        after this), so cached blocks carry MTP latents for every position that has a next
        token (a request that stops on an accepted draft's token has none for that slot)."""
        if self.speculative and rows:
            # rows with a known next token: all computed ones, less the last if it is the final token
            n = [min(s.num_computed, len(s) - 1) - st for _, s, st in rows]
            h_prev = [h[b, :k] for (b, _, _), k in zip(rows, n)]
            next_ids = [s.token_ids[st + 1:st + k + 1] for (_, s, st), k in zip(rows, n)]
            logits = self.runner.mtp(h_prev, next_ids, [st for _, _, st in rows],
                                     [s.block_table for _, s, _ in rows], absorb)
            drafts = logits.argmax(-1).tolist()
            for (_, seq, _), d in zip(rows, drafts):
                seq.draft = d if seq.in_decode and not seq.finished else None
        for _, seq, _ in rows:
            if seq.finished:
                continue
            self.block_manager.register_full_blocks(seq)

    # ------------------------------------------------------------------ sampling
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sample]:
        return sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def _append(self, seq: Sequence, smp: Sample) -> None:
        """Add one sampled token and decide whether the request is done."""
        p = seq.params
        seq.output_token_ids.append(smp.token)
        if smp.logprob is not None:
            seq.logprobs.append(smp.top_logprobs)
            seq.cumulative_logprob += smp.logprob
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_token_ids)
        if (not p.ignore_eos and smp.token in self.eos) or smp.token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", smp.token
            if self.tokenizer is not None and smp.token in self.eos:
                seq.text = self.tokenizer.decode(seq.output_token_ids[:-1])
        elif p.stop and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens:  # add() made prompt + max_tokens <= max_model_len
            seq.finish_reason = "length"

    @staticmethod
    def _hit_stop_string(seq: Sequence) -> bool:
        """Look for a stop string in the newest text (it may straddle tokens); cut the
        text there (keeping the stop string only if asked)."""
        hits = [(i, stop) for stop in seq.params.stop if (i := seq.text.find(stop)) >= 0]
        if not hits:
            return False
        i, stop = min(hits, key=lambda h: h[0])  # the earliest in the text, whatever the list order
        seq.stop_reason = stop
        seq.text = seq.text[:i + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return True
