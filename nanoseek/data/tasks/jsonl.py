"""Users' own tasks: a JSONL file, one problem per line.

    {"prompt": "What is the capital of France?", "answer": "Paris"}
    {"prompt": "Compute 1/4 + 1/4.", "answer": "1/2", "response": "<think>...</think>\\n<answer>1/2</answer>"}

`prompt` and `answer` are required (an answer may be a number), `response` (an SFT
demonstration) and `split` ("train" or "test", else a hash of the prompt decides) are
optional. `load_task("file.jsonl", reward="module:function", system="...")`; by default the
final answer tag (rewards.answer_of) is right when it equals `answer` as text (case and
spacing aside) or as mathematics; where `answer` is a number it must be one number (`40+2`
is not `42`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.data.tasks.base import (SPLITS, Example, Task, TaskError, check_split,
                                      make_rewarder, no_options_left, seeded_rng, split_of)
from nanoseek.data.tasks.rewards import load_reward, text_accuracy

FIELDS = ("prompt", "answer", "response", "split")


class JsonlTask(Task):
    def __init__(self, path: str | Path, reward=None, system: str | None = None, **options):
        self.path = Path(path)
        self.name, self.system = self.path.stem, system
        self.test_fraction = options.pop("test_fraction", self.test_fraction)
        self.max_tokens = options.pop("max_tokens", 512)
        check = load_reward(reward) if reward is not None else (
            lambda ex, c: text_accuracy(c, ex.answer))
        self.rewarder = make_rewarder(check, options)
        no_options_left(f"{self.path}", options)
        self.rows = {s: [] for s in SPLITS}
        for ex, split in read_rows(self.path):
            self.rows[split or split_of(f"{self.name}|{ex.prompt}", self.test_fraction)].append(ex)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Up to `n` rows of `split` (all with n=None), in an order fixed by the seed."""
        check_split(split, n, self.name)
        rows = self.rows[split][:]
        if not rows:
            raise TaskError(f"{self.path}: no {split} rows (add rows, or mark some with \"split\": \"{split}\")")
        seeded_rng(self.name, split, seed).shuffle(rows)
        return rows if n is None else rows[:n]


def read_rows(path: Path) -> list[tuple[Example, str | None]]:
    if not path.is_file():
        raise TaskError(f"{path}: no such task file (expected JSONL with prompt and answer)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rows.append(parse_row(line, f"{path}:{i}"))
    if not rows:
        raise TaskError(f"{path}: empty task file (expected JSONL rows with prompt and answer)")
    return rows


def parse_row(line: str, where: str) -> tuple[Example, str | None]:
    """One line -> (Example, its split or None); errors name the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise TaskError(f"{where}: missing {key!r} (a row needs prompt and answer)")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise TaskError(f"{where}: 'prompt' must be a non-empty string")
    answer = row["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise TaskError(f"{where}: 'answer' must be a non-empty string or a number")
    response, split = row.get("response"), row.get("split")
    if response is not None and not isinstance(response, str):
        raise TaskError(f"{where}: 'response' must be a string")
    if split is not None and split not in SPLITS:
        raise TaskError(f"{where}: 'split' is {split!r}, expected one of {SPLITS}")
    meta = {k: v for k, v in row.items() if k not in FIELDS}
    return Example(row["prompt"], answer.strip(), response, meta), split
