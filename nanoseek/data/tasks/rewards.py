"""Rule-based rewards for verifiable tasks (DeepSeek-R1's accuracy + format rewards, DAPO's
soft over-length penalty), the signal GRPO learns from and `nanoseek eval --task` scores.

A completion is expected in R1's shape, exactly once each:

    <think>
    ...reasoning...
    </think>
    <answer>123</answer>

- **accuracy** reads only the final answer: what follows the reasoning (the text after the
  last `</think>`; the whole completion if it has no think block; nothing if a `<think>` is
  never closed) must be exactly one `<answer>...</answer>`, whitespace and end-of-sentence
  tokens around it and nothing else. So an answer inside `<think>`, a correction after the
  tag ("Actually 43."), prose before it, a second answer tag or nested tags earn nothing:
  a grader that read any of them could be argued with, and RL learns to argue.
  A numeric answer must be one number (what math-verify reads as one, in these spellings:
  `834`, `+834`, `−834` with U+2212, `1,234`, `834.0`, `\\boxed{834}`, `$834$`, `\\(834\\)`),
  not an expression (`800+34`, `2*417` earn nothing), and a fraction (`1668/2`,
  `\\frac{1668}{2}`) only where the reference is not a whole number or is itself written
  as one: the arithmetic task asks for "the result" of integer arithmetic, and a division
  left undone is not it. Numbers are compared exactly (`0.5` = `1/2` = `\\frac{1}{2}`);
  math-verify decides only references that are not plain numbers. Countdown equations are
  parsed with `ast` (never eval'd) and checked number by number.
- **format**: `<think>` non-empty reasoning `</think>` then `<answer>` non-empty `</answer>`,
  nothing after, each tag exactly once (so extra or nested tags earn no format either).
- **over-length** (DAPO): 0 up to `max_length - cache_length`, then a linear penalty that
  reaches 1 at `max_length` and stays there.

`Rewarder` weighs them into one `Reward(total, components, correct)`; the default weights
(0.9 accuracy + 0.1 format) give 1.0 to a right answer in the right shape.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, NamedTuple

from nanoseek.calc.arithmetic import ExpressionError, evaluate_exact
from nanoseek.text.special_tokens import END_THINK, EOS, THINK

ANSWER, END_ANSWER = "<answer>", "</answer>"
R1_TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
MAX_ANSWER_CHARS = 200  # longer answers are not parsed (math-verify on huge input is slow)
# One number, ASCII digits: an integer (thousands grouped by commas, the first group not
# starting with 0: "0,042" is a decimal comma, not 42; or not grouped) or decimal, a/b,
# or \frac{a}{b}; a sign in front ("+", "-", or U+2212, the minus sign of typeset text).
_NUMBER = re.compile(r"(?P<sign>[-+\u2212]?)(?:"
                     r"(?P<int>[1-9][0-9]{0,2}(?:,[0-9]{3})+|[0-9]+)(?P<dec>\.[0-9]*)?|(?P<bare>\.[0-9]+)"
                     r"|(?P<num>[0-9]+)/(?P<den>[0-9]+)|\\[dt]?frac\{(?P<fnum>[0-9]+)\}\{(?P<fden>[0-9]+)\})")
# The wrappers math-verify reads a number out of (nested at most a few deep).
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("\\boxed{", "}"))
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits; a leading "+" is left to math-verify (it reads none)


@dataclass
class Reward:
    total: float
    components: dict[str, float] = field(default_factory=dict)
    correct: bool = False


# ----------------------------------------------------------------------------- the shape
def r1_response(think: str, answer: str) -> str:
    """The demonstration shape every task writes and `format_reward` accepts."""
    return f"{THINK}\n{think}\n{END_THINK}\n{ANSWER}{answer}{END_ANSWER}"


def strip_eos(completion: str) -> str:
    """The completion without the end-of-sentence tokens and whitespace it ends with (text
    after an end-of-sentence token is kept: it is text after the answer)."""
    end, n = len(completion), len(EOS)
    while True:
        while end and completion[end - 1].isspace():
            end -= 1
        if end < n or not completion.startswith(EOS, end - n):
            return completion[:end]
        end -= n


def answer_of(completion: str) -> str | None:
    """The final answer: the text of the one answer tag that follows the reasoning (after
    the last `</think>`, or the whole completion without a think block) with nothing else
    around it; None if the reasoning is never closed, or what follows it is anything but
    one well-formed tag (no tag, two, nested, or any text before or after)."""
    text = strip_eos(completion)
    _, closed, after = text.rpartition(END_THINK)
    if not closed and THINK in text:
        return None  # the answer would be inside unfinished reasoning
    return tagged(after)


def tagged(region: str) -> str | None:
    """The stripped, non-empty content of a region that is exactly `<answer>...</answer>`
    (whitespace around), with none of R1's tags inside; else None."""
    region = region.strip()
    if (len(region) < len(ANSWER) + len(END_ANSWER) or not region.startswith(ANSWER)
            or not region.endswith(END_ANSWER)):
        return None
    inner = region[len(ANSWER):-len(END_ANSWER)]
    if any(tag in inner for tag in R1_TAGS):
        return None
    return inner.strip() or None


def format_reward(completion: str) -> float:
    """1.0 for `<think>x</think> <answer>y</answer>` (x, y non-blank, each tag once,
    nothing else around them)."""
    text = strip_eos(completion).strip()
    if any(text.count(tag) != 1 for tag in R1_TAGS):
        return 0.0
    head, _, after = text.partition(END_THINK)
    return float(head.startswith(THINK) and bool(head[len(THINK):].strip())
                 and tagged(after) is not None)


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


class Number(NamedTuple):
    value: int | Fraction
    fraction: bool  # written as a/b or \\frac{a}{b}
    text: str       # ASCII, no wrapper, no "+", no thousands commas (what math-verify reads)


def read_number(text: str) -> Number | None:
    """`text` as one number (see the module docstring for the spellings), or None: an
    expression, words, two numbers, a zero denominator, or more than MAX_ANSWER_CHARS."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = text.strip()
    if text.isascii() and text.isdigit():  # the common case, without a regex or a Fraction
        return Number(int(text), False, text)
    for _ in range(3):  # "$\\boxed{42}$", "\\boxed{$42$}"
        wrap = next(((o, c) for o, c in _WRAPPERS if len(text) > len(o) + len(c)
                     and text.startswith(o) and text.endswith(c)), None)
        if wrap is None:
            break
        text = text[len(wrap[0]):-len(wrap[1])].strip()
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    sign = -1 if m["sign"] in ("-", "\u2212") else 1
    num, den = (m["num"], m["den"]) if m["num"] else (m["fnum"], m["fden"])
    if num is not None:
        if int(den) == 0:
            return None
        value, plain = Fraction(int(num), int(den)), f"{num}/{den}"
    else:
        plain = (m["int"] or "").replace(",", "") + (m["dec"] or m["bare"] or "")
        value = Fraction(plain) if m["dec"] or m["bare"] else int(plain)
    return Number(sign * value, num is not None, ("-" if sign < 0 else "") + plain)


def number_matches(given: str, expected: str) -> bool:
    """`given` is one number equal to `expected`. Plain numbers on both sides are compared
    exactly, in Python: no sympy parse, which math-verify spends ~1.6 ms on per answer and
    GRPO calls this for every sample. A fraction is no answer to a whole-number reference
    unless the reference is written as one (84/2 is a division left undone, not 42)."""
    g = read_number(given)
    if g is None:
        return False
    e = read_number(expected)
    if e is None:  # a reference that is not a plain number (e.g. \\sqrt{2}): math-verify decides
        return math_equal(g.text, expected)
    if g.fraction and not e.fraction and e.value.denominator == 1:
        return False
    return g.value == e.value


def numeric_accuracy(completion: str, expected: str) -> float:
    """1.0 when the final answer (answer_of) is one number equal to `expected`."""
    given = answer_of(completion)
    return 0.0 if given is None else float(number_matches(given, expected))


def text_accuracy(completion: str, expected: str) -> float:
    """User tasks: the final answer equals `expected` as text (case and spacing aside) or
    as mathematics; where `expected` is a plain number, the answer must be one number
    (number_matches: "40+2" is not "42", though math-verify would equate them)."""
    given = answer_of(completion)
    if given is None:
        return 0.0
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    if norm(given) == norm(expected):
        return 1.0
    if read_number(expected) is not None:
        return float(number_matches(given, expected))
    return float(math_equal(given, expected))


# ----------------------------------------------------------------------------- equations
def evaluate_expression(text: str, exact_division: bool = True,
                        allow_negation: bool = False) -> tuple[Fraction, list[int]]:
    """Value (exact) and the integers used, of `+ - * /` arithmetic on non-negative
    integers, read with `ast` (nothing is executed; calc/arithmetic.py's exact mode).
    `×` and `÷` are accepted."""
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(text) > MAX_ANSWER_CHARS:
        raise ExpressionError(f"expression of {len(text)} characters (at most {MAX_ANSWER_CHARS})")
    return evaluate_exact(text, exact_division, allow_negation)


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
    given = answer_of(completion)
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
