"""The prompt's size, bounded before anything is tokenised.

Tokenising is the step of a request whose time grows with what the client sent, and by far
the slowest per byte: a 3.9 MiB prompt (under the 4 MiB body limit) took 6.8 s to encode with
the tests' tokenizer on a shared 2-core CPU (tokenizers 0.23), where parsing its JSON took
3 ms — and the context check that refused it came only after. So characters are counted
first: a prompt of more characters than `max_model_len` times the vocabulary's longest token
cannot fit the context (each token covers at most that many characters; byte-level tokens
at most that many bytes), and is refused at once with a 400 `prompt_too_long` that names the
limit. `nanoseek serve --max-prompt-chars` sets another limit.

What passes is tokenised in a worker thread (app.py), so the event loop keeps streaming
other clients' tokens meanwhile — as far as the tokenizer lets go of the GIL while it works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest
from nanoseek.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptLimit:
    chars: int | None  # None: no text prompts (a model without a tokenizer takes token ids)
    why: str

    @classmethod
    def of(cls, tokenizer, max_model_len: int, chars: int | None = None) -> "PromptLimit":
        if chars is not None:
            return cls(chars, "set by the server")
        tok = Tokenizer.of(tokenizer)
        if tok is None:
            return cls(None, "no tokenizer")
        longest = max(map(len, tok.tok.get_vocab(with_added_tokens=True)), default=1)
        return cls(max_model_len * longest, f"a longer one cannot fit the {max_model_len}-token context: "
                                            f"no token spans more than {longest} characters")

    def check(self, chars: int, param: str) -> None:
        if self.chars is not None and chars > self.chars:
            raise APIError(400, f"{param}: the prompt has {chars} characters, over this server's limit of "
                                f"{self.chars} ({self.why}; nanoseek serve --max-prompt-chars)",
                           param=param, code="prompt_too_long")


def chat_chars(req: ChatCompletionRequest) -> int:
    """The characters a chat's messages put into its prompt (the template's markers aside)."""
    n = 0
    for m in req.messages:
        n += len(m.text()) + len(m.name or "")
        for call in m.tool_calls or []:
            fn = call["function"]
            args = fn["arguments"]
            n += len(fn["name"]) + len(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return n


def prompt_count(req: CompletionRequest) -> int:
    """How many prompts a completions request holds (str | [str] | [int] | [[int]])."""
    p = req.prompt
    return 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)


def completion_chars(req: CompletionRequest) -> list[int]:
    """Each text prompt's characters (token-id prompts are checked against the context)."""
    p = req.prompt
    return [len(p)] if isinstance(p, str) else [len(one) for one in p if isinstance(one, str)]
