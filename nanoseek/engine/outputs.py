"""What a request gives back: its token ids, its text decoded as the tokens arrive, and the
vLLM-shaped `RequestOutput` that `LLM`, `AsyncLLM` and the CLI hand out.

Decoding the whole output again for every new token costs O(n) per token, O(n²) per
request. `IncrementalDetokenizer` decodes only a small window instead, with vLLM's two
offsets: `prefix_offset..read_offset` are tokens already turned into text, kept as context
(byte-level BPE tokens can split one UTF-8 character, and some decoders need the previous
token to place a space); `read_offset..` are the new ones. The new text is released only
when the window decodes to more than its context and does not end in U+FFFD (half a
character), so released text never changes: it only grows.

Token ids always travel beside the text: `skip_special_tokens=True` (the default, as in
vLLM) drops DeepSeek's tool-call markers from the text, and a server or an agent that
needs them reads the ids or asks for `skip_special_tokens=False`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.engine.sampler import SamplingParams


class IncrementalDetokenizer:
    """One request's output text, one token at a time, with stop strings."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer, self.params = tokenizer, params
        self.token_ids: list[int] = []  # the tokens fed (eos is not: it has no text)
        self.text = ""                  # released text: complete characters, never rewritten
        self.prefix_offset = self.read_offset = 0
        self.prefix_text = ""           # decode(token_ids[prefix_offset:read_offset])
        self.stopped = False            # a stop string cut the text: it is final

    def _decode(self, start: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:], self.params.skip_special_tokens)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Feed one generated token. Returns the stop string it completed (the text is then
        cut before it, or after it with include_stop_str_in_output), else None."""
        old_len = len(self.text)
        self.token_ids.append(token_id)
        new_text = self._decode(self.prefix_offset)
        pending = new_text[len(self.prefix_text):]  # may end in half a character
        if check_stop and self.params.stop and (hit := self._find_stop(self.text + pending, old_len)):
            return hit
        if len(new_text) > len(self.prefix_text) and not new_text.endswith("\ufffd"):
            self.text += pending
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self.prefix_text = self._decode(self.prefix_offset)
        return None

    def _find_stop(self, text: str, old_len: int) -> str | None:
        """The earliest stop string in `text` (they may straddle tokens). Only the tail can
        hold a new hit: everything up to old_len was searched before, so each search is
        O(new text + longest stop string), not O(text)."""
        hits = []
        for stop in self.params.stop:
            i = text.find(stop, max(0, old_len - len(stop) + 1))
            if i >= 0:
                hits.append((i, stop))
        if not hits:
            return None
        i, stop = min(hits, key=lambda h: h[0])  # the earliest in the text, whatever the list order
        self.text = text[:i + (len(stop) if self.params.include_stop_str_in_output else 0)]
        self.stopped = True
        return stop

    def output_text(self, finished: bool) -> str:
        """The text to show. Finished: everything (a trailing half character included,
        as a full decode gives it). Running: the released text less any tail that could
        still grow into a stop string (a stop string is cut from the final text), so
        successive outputs only ever extend each other."""
        if self.stopped:
            return self.text
        if finished:
            return self.text + self._decode(self.prefix_offset)[len(self.prefix_text):]
        text, hold = self.text, 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per token: {token id: raw log-prob}
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: int | str | None = None
    error: str | None = None                  # why a request with finish_reason "error" failed

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0               # prompt tokens served by the prefix cache
    metrics: dict = field(default_factory=dict)


def stable_text(seq) -> str:
    """The text a stream may show now (see `IncrementalDetokenizer.output_text`)."""
    return seq.detokenizer.output_text(seq.finished) if seq.detokenizer is not None else ""


def request_output(seq) -> RequestOutput:
    """The cumulative output of one sequence. Lists are copied (the sequence grows on);
    the per-token logprob dicts are shared, never mutated once made."""
    p = seq.params
    comp = CompletionOutput(0, stable_text(seq), list(seq.output_token_ids),
                            seq.cumulative_logprob if p.logprobs is not None else None,
                            list(seq.logprobs) if p.logprobs is not None else None,
                            seq.finish_reason, seq.stop_reason, seq.error)
    return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), [comp], seq.finished,
                         seq.num_cached_prompt_tokens, {"num_preemptions": seq.num_preemptions})
