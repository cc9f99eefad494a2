"""One request as the engine sees it: its tokens, how many of them are in the cache,
its block table and its sampling state; and `SeqOutput`, what one forward produced for it.

Who writes what: the scheduler (its `postprocess`, `add`, `finish`, `preempt`) owns every
field of a sequence's state — tokens, num_computed, draft, status, finish — and the block
manager its blocks (block_table, num_hashed_blocks). The runner only reads sequences and
returns one `SeqOutput` per sequence (nano-vllm's schedule -> run -> postprocess); the
one thing it stores is an image's vision features, computed once (engine/vision.py).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from nanoseek.engine.sampler import Sample, SamplingParams

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    generator: torch.Generator | None = None
    detokenizer: object | None = None  # outputs.IncrementalDetokenizer when there is a tokenizer
    arrival: int = field(default_factory=lambda: next(_arrivals))  # younger = larger
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    window_table: list[int | None] = field(default_factory=list)  # V4: window blocks (engine/v4_blocks.py)
    num_computed: int = 0          # tokens whose latents are in the cache
    num_hashed_blocks: int = 0     # leading full blocks registered in the prefix cache
    num_cached_prompt_tokens: int = 0  # prefix-cache hit on (the last) admission
    num_preemptions: int = 0
    draft: int | None = None       # MTP's guess for the token after the pending one
    mtp_from: int | None = None    # the MTP layer's cache is whole from this position up to
    #                                num_computed; None: MTP has not run since a hole (spec_policy.py)
    max_tokens: int = 0            # params.max_tokens, or (None) what the context leaves: set by add()
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    error: str | None = None       # why a request failed (finish_reason "error")
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    images: list = field(default_factory=list)  # vision.PromptImage per image of the prompt, in order;
    #                                             their features are the one field the runner fills

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (called every step)."""
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return len(self) - self.num_computed

    @property
    def in_decode(self) -> bool:
        """Only the last sampled token is pending: the next step decodes one token."""
        return self.num_pending == 1 and self.num_computed >= len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SeqOutput:
    """What one forward produced for one sequence (the runner's answer, the scheduler's input)."""
    samples: list[Sample] = field(default_factory=list)  # none (a prompt chunk that is not the
    #                                  last), one, or two (the MTP draft was accepted)
    draft: int | None = None          # MTP's guess for the token after the last sample
    mtp_from: int | None = None       # the sequence's mtp_from after this forward (None: MTP did not run)
    error: str | None = None          # e.g. non-finite logits: the request fails
