"""Tasks with verifiable answers for post-training (SFT demonstrations, DPO pairs, GRPO
rewards) and held-out evaluation:

    task = load_task("arithmetic", digits=3)          # or "countdown", "tool_use", "file.jsonl",
                                                      # "rendered_arithmetic" (images)
    train = task.examples("train", 1000, seed=0)      # disjoint from task.examples("test", ...)
    task.messages(train[0])                           # chat messages, demonstration included
    task.reward(ex, completion)                       # Reward(total, components, correct)

Reward options every task takes: accuracy_weight (0.9), format_weight (0.1), max_length
(1024 characters, None = no limit), cache_length (256), overlong_weight (1.0), test_fraction.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.tasks.arithmetic import Arithmetic
from nanoseek.data.tasks.base import Example, Task, TaskError, split_of
from nanoseek.data.tasks.countdown import Countdown
from nanoseek.data.tasks.jsonl import JsonlTask
from nanoseek.data.tasks.rendered_arithmetic import RenderedArithmetic
from nanoseek.data.tasks.tool_use import ToolUse

TASKS = {"arithmetic": Arithmetic, "countdown": Countdown, "tool_use": ToolUse,
         "rendered_arithmetic": RenderedArithmetic}


def load_task(name_or_path: str | Path, **options) -> Task:
    """A built-in task by name (TASKS), or a user's JSONL file by path."""
    name = str(name_or_path)
    if name in TASKS:
        return TASKS[name](**options)
    if name.endswith(".jsonl") or Path(name).is_file():
        return JsonlTask(name, **options)
    raise TaskError(f"unknown task {name!r}: expected one of {sorted(TASKS)} or a .jsonl file")


__all__ = ["TASKS", "Example", "Task", "TaskError", "load_task", "split_of",
           "Arithmetic", "Countdown", "JsonlTask", "RenderedArithmetic", "ToolUse"]
