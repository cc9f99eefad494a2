"""Log-probabilities in OpenAI's two shapes, from the engine's per-token `{token id: logprob}`
dicts (the sampled token's raw log-prob plus the top n; engine/sampler.py).

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}, ...]}]}`. Completions (legacy): parallel lists `tokens`, `token_logprobs`,
`top_logprobs` (one `{token: logprob}` per position) and `text_offset`. A token's string
is its own decode with special tokens kept; a byte-level token that holds part of a UTF-8
character decodes to U+FFFD, which is why `bytes` is there.
"""

from __future__ import annotations

from nanoseek.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(d: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely (the dict may also hold the sampled token when it ranked lower)."""
    return sorted(d.items(), key=lambda kv: -kv[1])[:n]


def _entry(tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8", "replace")))


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> ChatLogprobs:
    content = []
    for t, d in zip(token_ids, logprobs):
        e = _entry(tokenizer, t, d[t])
        content.append(TokenLogprob(**e.model_dump(),
                                    top_logprobs=[_entry(tokenizer, k, v) for k, v in _top(d, top_n)]))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int,
                        offset: int = 0) -> CompletionLogprobs:
    """`offset`: where the first token's text starts (a stream continues its last chunk's)."""
    tokens, offsets = [], []
    for t in token_ids:
        tokens.append(token_text(tokenizer, t))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[d[t] for t, d in zip(token_ids, logprobs)],
        top_logprobs=[{token_text(tokenizer, k): v for k, v in _top(d, top_n)} for d in logprobs],
        text_offset=offsets)
