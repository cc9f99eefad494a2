"""Rule-based rewards for verifiable tasks (DeepSeek-R1's accuracy + format rewards, DAPO's
soft over-length penalty), the signal GRPO learns from and `nanoseek eval --task` scores.

A completion is expected in R1's shape, exactly once each:

    <think>
    ...reasoning...
    </think>
    <answer>123</answer>

- **accuracy**: only the text inside the one `<answer>` tag counts (a number written
  elsewhere earns nothing; two answer tags earn nothing). Numbers are compared with
  `math-verify` ("0.5" = "1/2" = "\\frac{1}{2}"), and a numeric answer must be a number,
  not an expression (else "<answer>478+356</answer>" would "equal" 834). Countdown
  equations are parsed with `ast` (never eval'd) and checked number by number.
- **format**: `<think>` non-empty reasoning `</think>` then `<answer>` non-empty `</answer>`,
  nothing after, each tag exactly once.
- **over-length** (DAPO): 0 up to `max_length - cache_length`, then a linear penalty that
  reaches 1 at `max_length` and stays there.

`Rewarder` weighs them into one `Reward(total, components, correct)`; the default weights
(0.9 accuracy + 0.1 format) give 1.0 to a right answer in the right shape.
"""

from __future__ import annotations

import ast
import importlib
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from nanoseek.special_tokens import END_THINK, EOS, THINK

ANSWER, END_ANSWER = "<answer>", "</answer>"
MAX_ANSWER_CHARS = 200  # longer answers are not parsed (math-verify on huge input is slow)
_NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d+)?|\.\d+)(\s*/\s*\d+)?|[-+]?\\frac\{\d+\}\{\d+\}")
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits; a leading "+" is left to math-verify (it reads none)
_R1 = re.compile(rf"{THINK}(?P<think>.*){END_THINK}\s*{ANSWER}(?P<answer>.*){END_ANSWER}",
                 re.DOTALL)


@dataclass
class Reward:
    total: float
    components: dict[str, float] = field(default_factory=dict)
    correct: bool = False


class ExpressionError(ValueError):
    """An expression that is not plain arithmetic on integers, or breaks a rule."""


# ----------------------------------------------------------------------------- the shape
def r1_response(think: str, answer: str) -> str:
    """The demonstration shape every task writes and `format_reward` accepts."""
    return f"{THINK}\n{think}\n{END_THINK}\n{ANSWER}{answer}{END_ANSWER}"


def strip_eos(completion: str) -> str:
    return completion.removesuffix(EOS).rstrip()


def answer_of(completion: str) -> str | None:
    """The text inside the completion's one answer tag (None if zero or several tags)."""
    if completion.count(ANSWER) != 1 or completion.count(END_ANSWER) != 1:
        return None
    start, end = completion.index(ANSWER) + len(ANSWER), completion.index(END_ANSWER)
    return completion[start:end].strip() if start <= end else None


def format_reward(completion: str) -> float:
    """1.0 for `<think>x</think> <answer>y</answer>` (x, y non-blank, each tag once)."""
    text = strip_eos(completion).strip()
    if any(text.count(tag) != 1 for tag in (THINK, END_THINK, ANSWER, END_ANSWER)):
        return 0.0
    m = _R1.fullmatch(text)
    return float(bool(m and m["think"].strip() and m["answer"].strip()))


def overlong_penalty(length: int, max_length: int | None, cache_length: int) -> float:
    """DAPO's soft over-long punishment, as a magnitude in [0, 1]."""
    if max_length is None or length <= max_length - cache_length:
        return 0.0
    if length > max_length or cache_length <= 0:
        return 1.0
    return (length - (max_length - cache_length)) / cache_length


# ----------------------------------------------------------------------------- accuracy
def math_equal(given: str, expected: str) -> bool:
    """Equivalent answers under math-verify (numbers, fractions, LaTeX)."""
    if len(given) > MAX_ANSWER_CHARS:
        return False
    if _INTEGER.fullmatch(given) and _INTEGER.fullmatch(expected):
        return int(given) == int(expected)  # exact, and ~1.6 ms less per answer than a sympy parse
    from math_verify import parse, verify
    # math-verify times out with signal.alarm, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold, pred = parse(expected, parsing_timeout=timeout), parse(given, parsing_timeout=timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # a parse that math-verify cannot finish is a wrong answer, not a crash
        return False


def numeric_accuracy(completion: str, expected: str) -> float:
    """1.0 when the tagged answer is a number equal to `expected`."""
    given = answer_of(strip_eos(completion))
    if given is None or not _NUMBER.fullmatch(given):
        return 0.0
    return float(math_equal(given, expected))


def text_accuracy(completion: str, expected: str) -> float:
    """User tasks: the tagged answer equals `expected` as text (case and spacing aside) or
    as mathematics."""
    given = answer_of(strip_eos(completion))
    if given is None:
        return 0.0
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    return float(norm(given) == norm(expected) or math_equal(given, expected))


# ----------------------------------------------------------------------------- equations
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate_expression(text: str, exact_division: bool = True,
                        allow_negation: bool = False) -> tuple[Fraction, list[int]]:
    """Value (exact) and the integers used, of `+ - * /` arithmetic on non-negative
    integers, read with `ast` (nothing is executed). `×` and `÷` are accepted."""
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(text) > MAX_ANSWER_CHARS:
        raise ExpressionError(f"expression of {len(text)} characters (at most {MAX_ANSWER_CHARS})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not an arithmetic expression: {text!r} ({type(e).__name__})")
    numbers: list[int] = []
    return _value(tree.body, numbers, exact_division, allow_negation), numbers


def _value(node, numbers: list[int], exact: bool, negation: bool) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and negation:
        return -_value(node.operand, numbers, exact, negation)
    if not (isinstance(node, ast.BinOp) and type(node.op) in _OPS):
        raise ExpressionError(f"{ast.unparse(node)!r}: only integers and + - * / are allowed")
    left = _value(node.left, numbers, exact, negation)
    right = _value(node.right, numbers, exact, negation)
    op = type(node.op)
    if op is ast.Div:
        if right == 0:
            raise ExpressionError(f"{ast.unparse(node)!r}: division by zero")
        if exact and (left / right).denominator != 1:
            raise ExpressionError(f"{ast.unparse(node)!r}: division is not exact")
        return left / right
    return left + right if op is ast.Add else left - right if op is ast.Sub else left * right


def check_equation(expression: str, numbers: list[int], target: int) -> str | None:
    """None if `expression` reaches `target` using only `numbers`, each at most once, with
    exact divisions; else why not."""
    try:
        value, used = evaluate_expression(expression)
    except ExpressionError as e:
        return str(e)
    left = list(numbers)
    for x in used:
        if x not in left:
            return (f"uses {x} more often than given" if x in numbers
                    else f"uses {x}, which is not one of {numbers}")
        left.remove(x)
    return None if value == target else f"evaluates to {value}, not {target}"


def equation_accuracy(completion: str, numbers: list[int], target: int) -> float:
    given = answer_of(strip_eos(completion))
    return float(given is not None and check_equation(given, numbers, target) is None)


# ----------------------------------------------------------------------------- combined
Check = Callable[[object, str], "float | bool"]  # (example, completion) -> accuracy in [0, 1]


@dataclass
class Rewarder:
    """accuracy (a task's check) x weight + format x weight - over-length penalty x weight.
    Lengths are in characters unless the caller passes its own (e.g. token counts together
    with a token budget)."""
    accuracy: Check
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    format: Callable[[str], float] = format_reward
    max_length: int | None = 1024
    cache_length: int = 256
    overlong_weight: float = 1.0

    def __call__(self, example, completion: str, length: int | None = None) -> Reward:
        acc = float(self.accuracy(example, completion))
        fmt = float(self.format(completion))
        over = overlong_penalty(len(completion) if length is None else length,
                                self.max_length, self.cache_length)
        parts = {"accuracy": acc, "format": fmt, "overlong": -over}
        total = self.accuracy_weight * acc + self.format_weight * fmt - self.overlong_weight * over
        return Reward(total, parts, correct=acc >= 1.0)


def load_reward(spec: "str | Check") -> Check:
    """A user's accuracy check: a callable, or "module:function" (importable, e.g. a file on
    PYTHONPATH). It gets (example, completion) and returns a float in [0, 1] or a bool;
    1.0 counts as correct. Format and over-length terms still apply (weights 0 turn them off)."""
    if callable(spec):
        return spec
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward {spec!r}: expected 'module:function' or a callable")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: cannot load {name} from {module} ({e})") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module}.{name} is not callable")
    return fn
