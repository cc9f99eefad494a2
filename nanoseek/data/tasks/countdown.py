"""Countdown (TinyZero's task): reach a target with the given numbers, each used at most
once, with + - * / where every division is exact.

`load_task("countdown", count=4, max_number=50, max_target=1000)`. Each problem is built
from a solution (a chain of operations over all the numbers), so every problem is solvable
and the demonstration is that chain, one operation per line:

    Using the numbers [7, 3, 12, 5] ... make 95.
    <think> 7+12=19 / 19*5=95 ... </think> <answer>(7 + 12) * 5</answer>

Any valid expression earns the reward, not only the one shown (rewards.check_equation).
"""

from __future__ import annotations

import random

from nanoseek.data.tasks.base import (FORMAT_HINT, Example, Task, TaskError, make_rewarder,
                                      no_options_left)
from nanoseek.data.tasks.rewards import equation_accuracy, r1_response


class Countdown(Task):
    name = "countdown"

    def __init__(self, count: int = 4, max_number: int = 50, max_target: int = 1000, **options):
        if not isinstance(count, int) or not 2 <= count <= 8:
            raise TaskError(f"task countdown: count={count!r} must be an integer in [2, 8]")
        if not isinstance(max_number, int) or max_number < 2:
            raise TaskError(f"task countdown: max_number={max_number!r} must be an integer >= 2")
        self.count, self.max_number, self.max_target = count, max_number, max_target
        self.max_tokens = 96 + 24 * count  # about twice the longest demonstration
        self.test_fraction = options.pop("test_fraction", self.test_fraction)
        self.rewarder = make_rewarder(
            lambda ex, c: equation_accuracy(c, ex.meta["numbers"], ex.meta["target"]), options)
        no_options_left("countdown", options)

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            chain = solve_chain(numbers, rng)
            if 1 <= chain[0] <= self.max_target:
                break
        target, expression, steps = chain
        prompt = (f"Using the numbers {numbers}, each at most once, with + - * / (exact "
                  f"division), make {target}. " + FORMAT_HINT.format(what="expression"))
        ex = Example(prompt, expression, r1_response("\n".join(steps), expression),
                     {"numbers": numbers, "target": target})
        return f"{sorted(numbers)}={target}", ex


def solve_chain(numbers: list[int], rng: random.Random) -> tuple[int, str, list[str]]:
    """A random chain ((a op b) op c) op ... over a shuffled copy of `numbers`, values kept
    positive and divisions exact: (value, expression, one line per operation)."""
    order = numbers[:]
    rng.shuffle(order)
    value, expr, steps = order[0], str(order[0]), []
    for x in order[1:]:
        choices = ["+", "*"] + (["-"] if value != x else []) + (
            ["/"] if x > 1 and value % x == 0 else [])
        op = rng.choice(choices)
        inner = f"({expr})" if steps else expr
        if op == "-" and value < x:  # keep it positive: subtract the chain from x
            new, line, expr = x - value, f"{x}-{value}={x - value}", f"{x} - {inner}"
        else:
            new = value + x if op == "+" else value - x if op == "-" else (
                value * x if op == "*" else value // x)
            line, expr = f"{value}{op}{x}={new}", f"{inner} {op} {x}"
        value = new
        steps.append(line)
    return value, expr, steps
