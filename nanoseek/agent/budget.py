"""The trajectory within a token budget.

Before each model call the messages are measured; while they are over `max_tokens`, the
oldest observation not yet shortened is replaced by its first `keep_chars` characters and a
note of how much was dropped (the message stays, so every tool call keeps its answer, as
the OpenAI API requires). The system prompt, the task and the newest observation are never
touched. What was shortened is returned, and the loop writes it to the trajectory.
Tokens are counted by `count_tokens` (a tokenizer's, if given) or estimated at 4
characters a token; an image part counts `IMAGE_TOKENS`.
"""

from __future__ import annotations

from collections.abc import Callable

IMAGE_TOKENS = 1000
SHORTENED = "[observation shortened to fit the token budget: {n:,} characters dropped]"


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


class ContextBudget:
    def __init__(self, max_tokens: int, count_tokens: Callable[[str], int] = estimate_tokens,
                 keep_chars: int = 200):
        self.max_tokens, self.count, self.keep_chars = max_tokens, count_tokens, keep_chars

    def size(self, messages: list[dict]) -> int:
        return sum(self._message_tokens(m) for m in messages)

    def _message_tokens(self, m: dict) -> int:
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            n = sum(self.count(p.get("text", "")) if p.get("type") == "text" else IMAGE_TOKENS
                    for p in content)
        else:
            n = self.count(content)
        for call in m.get("tool_calls") or []:
            n += self.count(call["function"]["name"] + call["function"]["arguments"])
        return n + 4

    def fit(self, messages: list[dict], observation_ids: list[int]) -> list[str]:
        """Shorten the oldest observations (indices into `messages`, oldest first) in place
        until the messages fit; returns one note per observation shortened."""
        notes = []
        for i in observation_ids[:-1]:  # the newest observation is kept whole
            if self.size(messages) <= self.max_tokens:
                break
            text = messages[i]["content"]
            if not isinstance(text, str) or len(text) <= self.keep_chars or SHORTENED[:20] in text:
                continue
            dropped = len(text) - self.keep_chars
            messages[i] = {**messages[i], "content": text[:self.keep_chars] + "\n" + SHORTENED.format(n=dropped)}
            notes.append(f"observation in message {i} shortened: {dropped:,} characters dropped "
                         f"to fit {self.max_tokens:,} tokens")
        if self.size(messages) > self.max_tokens:
            notes.append(f"still {self.size(messages):,} tokens after shortening every old "
                         f"observation (budget {self.max_tokens:,})")
        return notes
