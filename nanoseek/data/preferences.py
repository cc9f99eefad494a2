"""Preference pairs for DPO: JSONL rows -> chosen and rejected sequences whose labels are
the completion's tokens only.

A row is {"prompt": "...", "chosen": "...", "rejected": "..."} or {"messages": [...],
"chosen": ..., "rejected": ...} where the messages are the conversation so far (ending with
a user turn or tool outputs) and chosen/rejected are the assistant's next turn, as a string
or an assistant message (with tool calls). Both completions are rendered with the chat
template after the same prompt, so the two sequences differ only in the assistant's turn,
which is all the labels hold (its closing eos included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.data.chat import ChatDataError, encode_with_mask, read_jsonl, shift_labels
from nanoseek.model.transformer import IGNORE_INDEX


def prompt_messages(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ChatDataError(f"{where}: 'messages' must be a non-empty list of messages")
        return msgs
    if isinstance(row.get("prompt"), str):
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": row["prompt"]}]
    raise ChatDataError(f"{where}: expected 'prompt' (a string) or 'messages'; got keys {sorted(row)}")


def completion_message(row: dict, key: str, where: str) -> dict:
    value = row.get(key)
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and value.get("role", "assistant") == "assistant":
        return {**value, "role": "assistant"}
    raise ChatDataError(f"{where}: '{key}' must be a string or an assistant message, got "
                        f"{type(value).__name__}")


def read_pairs(path) -> list[dict]:
    """The rows of a pairs file, checked: each has a prompt and both completions."""
    rows = []
    for row, where in read_jsonl(path):
        if not isinstance(row, dict):
            raise ChatDataError(f"{where}: expected a JSON object")
        prompt_messages(row, where)
        for key in ("chosen", "rejected"):
            completion_message(row, key, where)
        rows.append({**row, "_where": where})
    return rows


@dataclass
class PairBatch:
    """Chosen and rejected sequences [P, S] each (padded), labels on the completions."""
    chosen: tuple[torch.Tensor, torch.Tensor]
    rejected: tuple[torch.Tensor, torch.Tensor]

    def __len__(self) -> int:
        return self.chosen[0].shape[0]

    def to(self, device) -> "PairBatch":
        return PairBatch(tuple(t.to(device) for t in self.chosen), tuple(t.to(device) for t in self.rejected))

    def select(self, rows: list[int]) -> "PairBatch":
        """These pairs, without the padding columns none of them needs (a sequence ends
        with its last label: the eos of its completion)."""
        def cut(x, y):
            x, y = x[rows], y[rows]
            cols = (y != IGNORE_INDEX).any(dim=0).nonzero()
            width = int(cols[-1]) + 1 if len(cols) else y.shape[1]
            return x[:, :width], y[:, :width]
        return PairBatch(cut(*self.chosen), cut(*self.rejected))


def encode_pairs(rows: list[dict], tokenizer, max_len: int) -> PairBatch:
    """Every pair as two padded sequences. A pair longer than max_len is refused rather
    than cut: cutting would change the question or the answer being judged."""
    seqs = {"chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        where = row.get("_where", f"pair {i}")
        prompt = prompt_messages(row, where)
        for key in seqs:
            ids, trained = encode_with_mask(prompt + [completion_message(row, key, where)], tokenizer, where)
            x, y = shift_labels(ids, trained)
            if len(x) > max_len:
                raise ChatDataError(f"{where}: prompt + {key} is {len(x)} tokens, more than "
                                    f"--seq-len {max_len}")
            seqs[key].append((x, y))
    width = max(len(x) for pairs in seqs.values() for x, _ in pairs)
    return PairBatch(*(_padded(seqs[k], width, tokenizer.pad_token_id) for k in ("chosen", "rejected")))


def _padded(pairs, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(pairs):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(labels)] = torch.tensor(labels)
    return x, y
