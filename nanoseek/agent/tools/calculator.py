"""Arithmetic without `eval`: the expression's syntax tree is walked, and only numbers,
operators and a few math functions are allowed.

Integers are Python's, so products of any size are exact (the multiplication the agent
demonstration relies on); `/` stays exact when it divides evenly. Powers and shifts whose
result would be huge are refused before they are computed, so `9**9**9` is an error, not a
hung process.
"""

from __future__ import annotations

import ast
import math
import operator

from nanoseek.agent.tools.base import Tool, ToolError

MAX_RESULT_BITS = 100_000   # about 30,000 decimal digits
FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
             "exp": math.exp, "log": math.log, "log10": math.log10, "sin": math.sin,
             "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
             "factorial": math.factorial, "gcd": math.gcd}
CONSTANTS = {"pi": math.pi, "e": math.e}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = "numbers, + - * / // % **, parentheses, " + ", ".join([*FUNCTIONS, *CONSTANTS])


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError names what is not allowed."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"calculator: {expression!r} is not an expression ({e.msg}); allowed: {ALLOWED}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError(f"calculator: division by zero in {expression!r}") from None
    except (OverflowError, ValueError) as e:
        raise ToolError(f"calculator: {e} in {expression!r}") from None


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(a, b)
        if isinstance(node.op, ast.Div):
            return a // b if isinstance(a, int) and isinstance(b, int) and b and a % b == 0 else a / b
        if type(node.op) in BINARY:
            return BINARY[type(node.op)](a, b)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords):
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 5000:
            raise ValueError(f"factorial({args[0]}) is too large")
        return FUNCTIONS[node.func.id](*args)
    raise ToolError(f"calculator: {ast.unparse(node)!r} is not allowed; allowed: {ALLOWED}")


def _power(a, b):
    """a ** b, refused when the result would exceed MAX_RESULT_BITS."""
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * abs(a).bit_length() > MAX_RESULT_BITS:
            raise ValueError(f"{a} ** {b} is too large (over {MAX_RESULT_BITS} bits)")
    return a ** b


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression exactly (integers of any size). "
                f"Allowed: {ALLOWED}.",
                {"type": "object", "properties": {"expression": {
                    "type": "string", "description": "e.g. 123 * 456"}}, "required": ["expression"]},
                lambda expression: str(evaluate(expression)))
