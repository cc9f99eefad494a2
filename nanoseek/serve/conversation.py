"""A conversation in the terminal (`nanoseek chat DIR`): the history, the slash commands,
and the prompt each turn sends — the same DeepSeek-V3 chat format the server renders, so a
model answers in the terminal as it would through the API.

Commands: `/reset` forgets the history (the system prompt stays), `/system TEXT` sets the
system prompt (empty: none) and starts afresh, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.text.chat_template import render_chat
from nanoseek.text.tokenizer import Tokenizer

HELP = "commands: /reset (forget the history), /system TEXT (set the system prompt), /exit"


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, in order

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt(self, user_text: str) -> str:
        """The text to generate from: the history, this user turn, the assistant's opening."""
        return render_chat(self.messages() + [{"role": "user", "content": user_text}], add_generation_prompt=True)

    def prompt_ids(self, tokenizer, user_text: str) -> list[int]:
        """`prompt` as token ids: the template's markers special, every turn's text plain
        (a `<｜User｜>` typed at the terminal stays text)."""
        return Tokenizer.of(tokenizer).encode_chat(
            self.messages() + [{"role": "user", "content": user_text}], add_generation_prompt=True)

    def record(self, user_text: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def forget_oldest(self) -> bool:
        """Drop the oldest exchange (to fit the context); False when there is none left."""
        if not self.turns:
            return False
        del self.turns[:2]
        return True

    def command(self, line: str) -> str | None:
        """Apply a slash command; returns what to tell the user ("exit" to leave), or None
        when the line is not a command (a message to the model)."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return "exit"
        if name == "/reset":
            self.turns = []
            return "(history cleared)"
        if name == "/system":
            self.system, self.turns = arg.strip() or None, []
            return f"(system prompt {'set' if self.system else 'cleared'}; history cleared)"
        return f"(unknown command {name}; {HELP})"
