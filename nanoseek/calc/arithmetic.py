"""Arithmetic without `eval`: the expression's syntax tree is walked, and only numbers,
operators and a few math functions are allowed. One walk, two modes:

- `evaluate` (the agent's calculator tool): integers, floats, `+ - * / // % **` and the
  functions in FUNCTIONS.
- `evaluate_exact` (the rewards' checker of a model's answer): only `+ - * /` on integer
  literals (unary minus on request), computed as exact fractions, divisions exact on
  request, and the integer literals read, in order (Countdown checks that each is one it
  was given).

Integers are exact up to MAX_DIGITS (10,000) decimal digits: every number (a literal, an
intermediate value, the result) is checked against 10**10000 exactly, and printed whole
(through `decimal`, so Python's 4,300-digit int-to-str limit, a process-wide setting left
as it is, does not apply; literals past it are read the same way). `/` stays exact when it
divides evenly. Work is bounded before it is done: a power, a product, a factorial or a
`round` to negative digits whose result certainly exceeds the bound is refused without
being computed (`round(1, -10**8)` is 0 without computing 10**100000000), so each step
costs at most about a 66,000-bit operation; the expression is at most MAX_EXPRESSION_CHARS
long, which bounds the number of steps (the slowest expression tried, 25,000 characters of
`gcd(9**10000,7**10000)+...`, took 2.4 s on a shared 2-core AMD EPYC VM). Floats must stay
finite. The walk keeps its own stack: a long chain (`1+1+...+1`) costs no recursion.
"""

from __future__ import annotations

import ast
import decimal
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DIGITS = 10_000
MAX_EXPRESSION_CHARS = 25_000       # room for two 10,000-digit operands
LIMIT = 10 ** MAX_DIGITS            # every integer's absolute value stays below this
MAX_BITS = LIMIT.bit_length()       # an integer with more bits is certainly too large
FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
             "exp": math.exp, "log": math.log, "log10": math.log10, "sin": math.sin,
             "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
             "factorial": math.factorial, "gcd": math.gcd}
CONSTANTS = {"pi": math.pi, "e": math.e}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = "numbers, + - * / // % **, parentheses, " + ", ".join([*FUNCTIONS, *CONSTANTS])
EXACT_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
             ast.Div: operator.truediv}
LONG_LITERAL = re.compile(r"(?<![\w.])[0-9][0-9_]{99,}(?![\w.])")   # 100+ characters
EXACT_CHARS = re.compile(r"[0-9+\-*/()\s]+")                           # evaluate_exact's alphabet
DECIMAL_LITERAL = re.compile(r"0+(_0+)*|[1-9][0-9]*(_[0-9]+)*")       # Python's own syntax


class ExpressionError(ValueError):
    """An expression that is not allowed, or whose value breaks a bound or a rule; the
    message names the part of the expression at fault."""


class _TooLarge(Exception):
    """A result over the bound: the message names what was refused."""


def format_number(value: int | float) -> str:
    """The value as text; integers whole, whatever `sys.get_int_max_str_digits()` is."""
    return str(decimal.Decimal(value)) if isinstance(value, int) else repr(value)


def walk(root: ast.AST, operands, step):
    """Post-order walk with an explicit stack: `operands(node)` lists the nodes `node` is
    computed from (raising if `node` is not allowed), `step(node, values)` computes it."""
    values: list = []
    stack: list[tuple[ast.AST, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        kids = operands(node)
        if not ready:
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
            continue
        args = values[len(values) - len(kids):]
        del values[len(values) - len(kids):]
        values.append(step(node, args))
    return values[0]


# ------------------------------------------------------------ the calculator
@dataclass
class _Source:
    text: str                       # what ast.parse read (long literals as names)
    names: dict[str, int]           # those names' values
    prefix: str = "_n"              # the names' prefix, one the expression does not contain

    def show(self, node: ast.AST, width: int = 120) -> str:
        """The node as the model wrote it (long literals as "<N-digit number>"), cut to width."""
        text = ast.get_source_segment(self.text, node) or type(node).__name__
        if self.names:
            text = re.sub(re.escape(self.prefix) + r"[0-9]+", self._described, text)
        return _short(" ".join(text.split()), width)

    def _described(self, m: re.Match) -> str:
        value = self.names.get(m.group())
        return m.group() if value is None else f"<{len(format_number(value))}-digit number>"


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ExpressionError names what is not allowed."""
    if not isinstance(expression, str):
        raise ExpressionError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"the expression has {len(expression):,} characters; "
                              f"at most {MAX_EXPRESSION_CHARS:,}")
    source = _read_long_literals(expression.strip())
    try:
        tree = ast.parse(source.text, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"{_short(expression)!r} is not an expression ({e.msg}); "
                              f"allowed: {ALLOWED}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is nested too deeply; split it into "
                              "several calls") from None
    try:
        return walk(tree.body, lambda n: _operands(n, source), lambda n, a: _step(n, a, source))
    except ZeroDivisionError:
        raise ExpressionError(f"division by zero in {_short(expression)!r}") from None


def _read_long_literals(expression: str) -> _Source:
    """Long decimal integer literals, replaced by names and read through `decimal`:
    `ast.parse` would refuse those over the int-str limit (4,300 digits by default)."""
    names: dict[str, int] = {}
    prefix = "_n"
    while prefix in expression:                   # the model cannot name a literal itself
        prefix += "_"

    def replace(m: re.Match) -> str:
        if not DECIMAL_LITERAL.fullmatch(m.group()):
            return m.group()                      # malformed: ast.parse reports it
        text = m.group().replace("_", "")
        if len(text) > MAX_DIGITS:
            raise ExpressionError(f"a number with {len(text):,} digits is too large; "
                                  f"numbers have at most {MAX_DIGITS:,} digits")
        name = f"{prefix}{len(names)}"
        names[name] = int(decimal.Decimal(text))
        return name

    return _Source(LONG_LITERAL.sub(replace, expression), names, prefix)


def _operands(node: ast.AST, src: _Source) -> list[ast.AST]:
    """The nodes `node` is computed from; ExpressionError if `node` is not allowed at all."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return []
    if isinstance(node, ast.Name) and (node.id in CONSTANTS or node.id in src.names):
        return []
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return [node.operand]
    if isinstance(node, ast.BinOp) and (type(node.op) in BINARY or isinstance(node.op, (ast.Pow, ast.Div))):
        return [node.left, node.right]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)):
        return list(node.args)
    raise ExpressionError(f"{src.show(node)!r} is not allowed; allowed: {ALLOWED}")


def _step(node: ast.AST, args: list, src: _Source):
    """One node's value from its operands' values, checked against the bounds."""
    try:
        value = _compute(node, args, src.names)
    except _TooLarge as e:
        raise ExpressionError(f"{src.show(node)} is too large: {e}") from None
    except (OverflowError, ValueError, TypeError) as e:
        raise ExpressionError(f"{src.show(node)}: {e}") from None
    if type(value) is int and abs(value) >= LIMIT:
        raise ExpressionError(f"{src.show(node)} is too large: {_over()}")
    if type(value) is float and not math.isfinite(value):
        raise ExpressionError(f"{src.show(node)} overflows a float (the result is not finite)")
    if type(value) not in (int, float):
        raise ExpressionError(f"{src.show(node)} is not a real number ({type(value).__name__})")
    return value


def _compute(node: ast.AST, args: list, names: dict):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return CONSTANTS[node.id] if node.id in CONSTANTS else names[node.id]
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](args[0])
    if isinstance(node, ast.BinOp):
        return _binary(node.op, *args)
    return _call(node.func.id, args)


def _binary(op: ast.operator, a, b):
    if isinstance(op, ast.Pow):
        return _power(a, b)
    if isinstance(op, ast.Div):
        return a // b if type(a) is int and type(b) is int and b and a % b == 0 else a / b
    if isinstance(op, ast.Mult) and type(a) is int and type(b) is int and a and b:
        if a.bit_length() + b.bit_length() - 1 > MAX_BITS:     # the product has at least this many
            raise _TooLarge(_over())
    return BINARY[type(op)](a, b)


def _power(a, b):
    """a ** b, refused when |a| >= 2 and a ** b has certainly more than MAX_BITS bits."""
    if type(a) is int and type(b) is int and b > 0 and abs(a) > 1:
        if b > MAX_BITS or b * (abs(a).bit_length() - 1) + 1 > MAX_BITS:
            raise _TooLarge(_over())
    return a ** b


def _call(name: str, args: list):
    if name == "factorial":
        return _factorial(*args)
    if name == "round":
        return _round(*args)
    return FUNCTIONS[name](*args)


def _factorial(n):
    if type(n) is not int:
        raise TypeError(f"factorial takes an integer, not {type(n).__name__}")
    if n > 100_000 or (n > 1 and math.lgamma(n + 1) / math.log(10) > MAX_DIGITS + 1):
        raise _TooLarge(_over())
    return math.factorial(n)


def _round(x, ndigits=None):
    """round(); an integer rounded to more than MAX_DIGITS negative digits is 0 (|x| is
    below 10**MAX_DIGITS), found without computing 10**-ndigits as Python would."""
    if ndigits is not None and type(ndigits) is not int:
        raise TypeError(f"round's ndigits must be an integer, not {type(ndigits).__name__}")
    if type(x) is int and ndigits is not None and -ndigits > MAX_DIGITS:
        return 0
    return round(x) if ndigits is None else round(x, ndigits)


def _over() -> str:
    return f"the result would have more than {MAX_DIGITS:,} digits (the calculator's limit)"


def _short(text: str, width: int = 120) -> str:
    return text if len(text) <= width else text[:width - 5] + " ..."


# ------------------------------------------------------------ the exact mode
def evaluate_exact(text: str, exact_division: bool = True,
                   allow_negation: bool = False) -> tuple[Fraction, list[int]]:
    """Value (an exact fraction) and the integer literals used, in order, of `+ - * /`
    arithmetic on non-negative integers (`-x` too with allow_negation); with
    exact_division, a division that leaves a remainder is an error."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression of {len(text)} characters (at most {MAX_EXPRESSION_CHARS})")
    if stray := EXACT_CHARS.sub("", text):
        # Python's syntax reads more than arithmetic: a comment (`# ...`), `0x1f`, `1_2`
        raise ExpressionError(f"{stray[:20]!r} in {text[:80]!r}: only integers and + - * / are allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not an arithmetic expression: {text!r} ({type(e).__name__})")
    numbers: list[int] = []
    value = walk(tree.body, lambda n: _exact_operands(n, allow_negation),
                 lambda n, a: _exact_step(n, a, numbers, exact_division))
    return value, numbers


def _exact_operands(node: ast.AST, negation: bool) -> list[ast.AST]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return []
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and negation:
        return [node.operand]
    if isinstance(node, ast.BinOp) and type(node.op) in EXACT_OPS:
        return [node.left, node.right]
    raise ExpressionError(f"{ast.unparse(node)!r}: only integers and + - * / are allowed")


def _exact_step(node: ast.AST, args: list[Fraction], numbers: list[int], exact: bool) -> Fraction:
    if isinstance(node, ast.Constant):
        numbers.append(node.value)
        value = Fraction(node.value)
    elif isinstance(node, ast.UnaryOp):
        value = -args[0]
    else:
        left, right = args
        if isinstance(node.op, ast.Div) and right == 0:
            raise ExpressionError(f"{ast.unparse(node)!r}: division by zero")
        if isinstance(node.op, ast.Div) and exact and (left / right).denominator != 1:
            raise ExpressionError(f"{ast.unparse(node)!r}: division is not exact")
        value = EXACT_OPS[type(node.op)](left, right)
    if abs(value.numerator) >= LIMIT or value.denominator >= LIMIT:
        raise ExpressionError(f"{ast.unparse(node)!r} is too large: {_over()}")
    return value
