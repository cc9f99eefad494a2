"""One request's completions as OpenAI objects: the whole response, or the stream of chunks.

The engine hands out *cumulative* outputs (all the text and tokens so far); a chunk carries
only what is new since the last one, per choice — its text delta, the log-probs of its new
tokens, and at the end its finish_reason. The text of a running request never shrinks
(engine/outputs.py holds back half characters and possible stop strings), so a delta is
a plain suffix. Chat streams open each choice with `{"role": "assistant"}`, as OpenAI's do.
"""

from __future__ import annotations

from nanoseek.engine.outputs import CompletionOutput
from nanoseek.serve import protocol as P
from nanoseek.serve.logprobs import chat_logprobs, completion_logprobs


class Formatter:
    """Shared by chat and completions: ids, usage, what each choice has already sent."""
    prefix = ""

    def __init__(self, model: str, tokenizer, logprobs: int | None, prompt_tokens: int,
                 include_usage: bool = False, continuous_usage: bool = False):
        self.id, self.created = P.new_id(self.prefix), P.now()
        self.model, self.tokenizer, self.top_n = model, tokenizer, logprobs
        self.prompt_tokens = prompt_tokens
        self.include_usage, self.continuous_usage = include_usage, continuous_usage
        self.sent_text: dict[int, int] = {}    # choice -> characters sent
        self.sent_tokens: dict[int, int] = {}  # choice -> tokens sent
        self.generated: dict[int, int] = {}    # choice -> tokens generated so far

    def usage(self) -> P.Usage:
        done = sum(self.generated.values())
        return P.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done,
                       total_tokens=self.prompt_tokens + done)

    def response(self, outs: dict[int, CompletionOutput]) -> dict:
        for i, c in outs.items():
            self.generated[i] = len(c.token_ids)
        return self._response([self._choice(i, c) for i, c in sorted(outs.items())]).model_dump()

    def chunks(self, latest: dict[int, CompletionOutput]) -> list[dict]:
        """The chunks for the choices that moved; one per choice, usage as asked."""
        out = []
        for i, c in sorted(latest.items()):
            self.generated[i] = len(c.token_ids)
            tok0, txt0 = self.sent_tokens.get(i, 0), self.sent_text.get(i, 0)
            new_ids = c.token_ids[tok0:]
            delta = c.text[txt0:]
            if not delta and c.finish_reason is None and i in self.sent_tokens:
                continue  # tokens whose text is held back: nothing to show yet
            lps = c.logprobs[tok0:] if c.logprobs is not None and self.top_n is not None else None
            chunk = self._chunk(i, delta, new_ids, lps, c.finish_reason, first=i not in self.sent_tokens)
            self.sent_tokens[i], self.sent_text[i] = len(c.token_ids), len(c.text)
            if self.continuous_usage:
                chunk.usage = self.usage()
            out.append(chunk.model_dump())
        return out

    def usage_chunk(self) -> dict:
        return self._chunk_object([], self.usage()).model_dump()


class ChatFormatter(Formatter):
    prefix = "chatcmpl"

    def _choice(self, i: int, c: CompletionOutput) -> P.ChatChoice:
        lp = (chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, self.top_n)
              if self.top_n is not None and c.logprobs is not None else None)
        return P.ChatChoice(index=i, message=P.AssistantMessage(content=c.text), logprobs=lp,
                            finish_reason=c.finish_reason)

    def _response(self, choices) -> P.ChatCompletionResponse:
        return P.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=self.usage())

    def _chunk(self, i, delta, new_ids, lps, finish, first) -> P.ChatCompletionChunk:
        lp = chat_logprobs(self.tokenizer, new_ids, lps, self.top_n) if lps is not None else None
        choice = P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant" if first else None, content=delta),
                                   logprobs=lp, finish_reason=finish)
        return self._chunk_object([choice])

    def _chunk_object(self, choices, usage=None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                     usage=usage)


class CompletionFormatter(Formatter):
    prefix = "cmpl"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next token

    def _choice(self, i: int, c: CompletionOutput) -> P.CompletionChoice:
        lp = (completion_logprobs(self.tokenizer, c.token_ids, c.logprobs, self.top_n)
              if self.top_n is not None and c.logprobs is not None else None)
        return P.CompletionChoice(index=i, text=c.text, logprobs=lp, finish_reason=c.finish_reason)

    def _response(self, choices) -> P.CompletionResponse:
        return P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                    usage=self.usage())

    def _chunk(self, i, delta, new_ids, lps, finish, first) -> P.CompletionResponse:
        lp = None
        if lps is not None:
            lp = completion_logprobs(self.tokenizer, new_ids, lps, self.top_n, self.offsets.get(i, 0))
            if lp.tokens:
                self.offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
        return self._chunk_object([P.CompletionChoice(index=i, text=delta, logprobs=lp, finish_reason=finish)])

    def _chunk_object(self, choices, usage=None) -> P.CompletionResponse:
        return P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                    usage=usage)


def replay_chunks(response: dict, include_usage: bool) -> list[dict]:
    """A stored (non-streamed) response as a stream: one chunk per choice holding all of it."""
    chat = response["object"] == "chat.completion"
    base = {k: response[k] for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    chunks = []
    for c in response["choices"]:
        body = ({"delta": {"role": "assistant", "content": c["message"]["content"]}} if chat
                else {"text": c["text"]})
        chunks.append({**base, "choices": [{"index": c["index"], **body, "logprobs": c.get("logprobs"),
                                            "finish_reason": c["finish_reason"]}], "usage": None})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": response.get("usage")})
    return chunks
