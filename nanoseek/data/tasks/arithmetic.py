"""Multi-digit arithmetic (+, -, *) with digit-by-digit demonstrations.

`load_task("arithmetic", digits=3, ops="+-*")`. Operands have exactly `digits` digits.
The demonstrations work column by column, as one would on paper, one short line per
column, so a tiny model (whose tokenizer splits digits one by one) can learn the procedure:

    Compute 478 + 356.  ->  <think> 8+6=14, carry 1 / 7+5+1=13, carry 1 / 4+3+1=8 </think>
                            <answer>834</answer>

Multiplication writes one partial product per digit of the second operand, then their sum.
"""

from __future__ import annotations

import random

from nanoseek.data.tasks.base import (FORMAT_HINT, Example, Task, TaskError, make_rewarder,
                                      no_options_left)
from nanoseek.data.tasks.rewards import numeric_accuracy, r1_response

OPS = "+-*"


class Arithmetic(Task):
    def __init__(self, digits: int = 3, ops: str = OPS, **options):
        if not isinstance(digits, int) or not 1 <= digits <= 18:
            raise TaskError(f"task arithmetic: digits={digits!r} must be an integer in [1, 18]")
        if not ops or set(ops) - set(OPS):
            raise TaskError(f"task arithmetic: ops={ops!r} must be some of {OPS!r}")
        self.name, self.digits, self.ops = "arithmetic", digits, ops
        self.test_fraction = options.pop("test_fraction", self.test_fraction)
        # About twice the longest demonstration (a line per column or partial product).
        self.max_tokens = 48 + 12 * digits * (digits + 1) if "*" in ops else 64 + 32 * digits
        options.setdefault("max_length", max(1024, 4 * self.max_tokens))  # characters
        self.rewarder = make_rewarder(lambda ex, c: numeric_accuracy(c, ex.answer), options)
        no_options_left("arithmetic", options)

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        key, a, op, b = draw_problem(rng, self.digits, self.ops)
        return key, make_example(a, op, b)


def draw_problem(rng: random.Random, digits: int, ops: str) -> tuple[str, int, str, int]:
    """(split key, a, op, b): two `digits`-digit operands and an operator. The key is the
    problem in one form (3+5 and 5+3 alike), so the split never puts one in both halves."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(lo, 10 ** digits - 1), rng.randint(lo, 10 ** digits - 1)
    op = rng.choice(ops)
    key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
    return key, a, op, b


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_example(a: int, op: str, b: int) -> Example:
    value = apply(a, op, b)
    steps = {"+": add_steps, "-": sub_steps, "*": mul_steps}[op](a, b)
    prompt = f"Compute {a} {op} {b}. " + FORMAT_HINT.format(what="result")
    return Example(prompt, str(value), r1_response("\n".join(steps), str(value)),
                   {"a": a, "op": op, "b": b})


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs from the ones column up, the shorter number padded with zeros."""
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return [(int(x), int(y)) for x, y in zip(sa.zfill(width)[::-1], sb.zfill(width)[::-1])]


def add_steps(a: int, b: int) -> list[str]:
    lines, carry = [], 0
    for x, y in _columns(a, b):
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s}" + (", carry 1" if s >= 10 else ""))
        carry = int(s >= 10)
    return lines


def sub_steps(a: int, b: int) -> list[str]:
    if a < b:
        return [f"{a}<{b}, so the result is -({b}-{a})"] + sub_steps(b, a)
    lines, borrow = [], 0
    for x, y in _columns(a, b):
        v = x - y - borrow
        line = f"{x}-{y}{'-1' if borrow else ''}={v}"
        lines.append(line + (f", +10={v + 10}, borrow 1" if v < 0 else ""))
        borrow = int(v < 0)
    return lines


def mul_steps(a: int, b: int) -> list[str]:
    parts = [(int(d), 10 ** i) for i, d in enumerate(str(b)[::-1])]
    lines = [f"{a}*{d * p}={a * d * p}" for d, p in parts]
    if len(parts) > 1:
        lines.append("+".join(str(a * d * p) for d, p in parts) + f"={a * b}")
    return lines
