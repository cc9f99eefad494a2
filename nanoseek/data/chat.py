"""Conversations for supervised fine-tuning: JSONL rows -> token ids + assistant-only labels,
packed into fixed-length windows.

A row is either {"messages": [{"role", "content", ...}, ...]} (OpenAI/DeepSeek chat
messages, tool calls and tool outputs included) or {"prompt": ..., "response": ...} (one
user turn and the assistant's answer; an optional "system"). The conversation is rendered
with DeepSeek-V3's chat template piece by piece (`chat_parts`): only the pieces the
assistant writes (its text, its tool calls, its closing eos) become targets; system, user
and tool-output tokens are context and their labels are IGNORE_INDEX. Content is encoded as
text: a special-token string inside a row's message is spelled in ordinary tokens, never
read as a turn marker (only `<think>`/`</think>` in an assistant's text are markers).

Packing: conversations are laid end to end into windows of `seq_len` tokens (the tail of a
window is padding with IGNORE_INDEX labels), so no compute is spent on padding. Inside a
window attention is *not* reset between conversations: a later conversation can attend to
an earlier one and positions run on across the window. Each conversation starts with its
own BOS, and at this scale (short windows, a few conversations per window) this costs
nothing measurable; it is what TRL's plain `packing=True` and minimind do. A conversation
longer than a window is cut at `seq_len` (counted in `ChatWindows.truncated`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.text.chat_template import ChatFormatError, chat_parts
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.text.tokenizer import Tokenizer


class ChatDataError(ValueError):
    """A chat data file (or one of its rows) cannot be used: names the file and line."""


# ------------------------------------------------------------------ reading
def row_messages(row, where: str) -> list[dict]:
    """One JSONL row -> chat messages (see the module docstring for the two layouts)."""
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ChatDataError(f"{where}: 'messages' must be a list of objects")
        if not any(m.get("role") == "assistant" for m in msgs):
            raise ChatDataError(f"{where}: no assistant message, so nothing to learn")
        return msgs
    if "prompt" in row and "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise ChatDataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["response"]}]
    raise ChatDataError(f"{where}: expected 'messages', or 'prompt' and 'response'; got keys "
                        f"{sorted(row)}")


def read_jsonl(path: str | Path) -> list[tuple[dict, str]]:
    """(row, "file:line") for every non-blank line; a line that is not JSON is an error."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading BOM is no data
            except UnicodeDecodeError as e:
                raise ChatDataError(f"{path}:{n}: not UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                json.dumps(row, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is no text
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{path}:{n}: not valid JSON ({e})") from None
            except RecursionError:
                raise ChatDataError(f"{path}:{n}: JSON nested too deep to be a row") from None
            except UnicodeEncodeError as e:
                raise ChatDataError(f"{path}:{n}: holds {e.object[e.start:e.end]!r}, a lone surrogate, "
                                    "not text") from None
            rows.append((row, f"{path}:{n}"))
    if not rows:
        raise ChatDataError(f"{path}: no rows")
    return rows


def read_conversations(paths) -> list[list[dict]]:
    """Every conversation of the JSONL files `paths` (a path or a list of them)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [row_messages(row, where) for p in paths for row, where in read_jsonl(p)]


# ----------------------------------------------------------------- encoding
def encode_with_mask(messages: list[dict], tokenizer, where: str = "conversation",
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether the assistant wrote it
    (`Tokenizer.encode_parts`: BOS once, the markers as ids, content as text, so a marker
    written in a data row stays text)."""
    try:
        parts = chat_parts(messages, add_generation_prompt)
    except (ChatFormatError, KeyError, TypeError) as e:
        raise ChatDataError(f"{where}: {e}") from None
    return Tokenizer.of(tokenizer).encode_parts(parts)


def shift_labels(ids: list[int], trained: list[bool]) -> tuple[list[int], list[int]]:
    """inputs = ids[:-1]; labels[i] = ids[i + 1] where the assistant wrote token i + 1,
    IGNORE_INDEX elsewhere (the prediction of a prompt token is not learned)."""
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
    return ids[:-1], labels


# ------------------------------------------------------------------ packing
@dataclass
class ChatWindows:
    """Fixed-length training windows: inputs and labels [N, seq_len] (int64)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    conversations: int
    truncated: int = 0  # conversations cut at seq_len
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def batch(self, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (step * grad_accum + micro): the windows in a seeded order that
        changes every epoch. A pure function of its arguments, so a resumed run continues
        with exactly the batches it would have seen."""
        n = len(self)
        rows = []
        for k in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(k, n)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            rows.append(int(order[pos]))
        return self.inputs[rows], self.labels[rows]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
         packing: bool = True) -> ChatWindows:
    """(inputs, labels) pairs -> windows of seq_len, several conversations per window when
    `packing` (in order, a conversation never split across windows), else one each."""
    windows: list[tuple[list[int], list[int]]] = []
    truncated = 0
    cur_x: list[int] = []
    cur_y: list[int] = []
    for x, y in examples:
        if len(x) > seq_len:
            x, y, truncated = x[:seq_len], y[:seq_len], truncated + 1
        if cur_x and (not packing or len(cur_x) + len(x) > seq_len):
            windows.append((cur_x, cur_y))
            cur_x, cur_y = [], []
        cur_x, cur_y = cur_x + x, cur_y + y
    if cur_x:
        windows.append((cur_x, cur_y))
    inputs = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(windows):
        inputs[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ChatWindows(inputs, labels, len(examples), truncated)


def chat_windows(conversations: list[list[dict]], tokenizer, seq_len: int,
                 packing: bool = True) -> ChatWindows:
    """Conversations -> packed windows with assistant-only labels."""
    examples = []
    for i, msgs in enumerate(conversations):
        ids, trained = encode_with_mask(msgs, tokenizer, where=f"conversation {i}")
        x, y = shift_labels(ids, trained)
        if all(t == IGNORE_INDEX for t in y):
            raise ChatDataError(f"conversation {i}: the assistant's turns are empty, nothing to learn")
        examples.append((x, y))
    if not examples:
        raise ChatDataError("no conversations to train on")
    windows = pack(examples, seq_len, tokenizer.pad_token_id, packing)
    windows.meta = {"conversations": windows.conversations, "windows": len(windows),
                    "targets": windows.targets, "truncated": windows.truncated,
                    "tokens": sum(len(x) for x, _ in examples), "packing": packing}
    return windows
