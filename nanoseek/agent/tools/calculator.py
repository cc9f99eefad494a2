"""The calculator tool: arithmetic without `eval`, by nanoseek/calc/arithmetic.py (the
syntax tree walked, only numbers, operators and a few math functions allowed; integers
exact up to MAX_DIGITS (10,000) decimal digits and printed whole; work bounded before it
is done; the expression at most MAX_EXPRESSION_CHARS long). The tool also runs in a child
process killed at its timeout (`Tool.isolate`), in case some C path was missed.
"""

from __future__ import annotations

from nanoseek.agent.tools.base import Tool, ToolError
from nanoseek.calc import arithmetic
from nanoseek.calc.arithmetic import ALLOWED, MAX_DIGITS, MAX_EXPRESSION_CHARS, format_number  # noqa: F401


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError names what is not allowed."""
    try:
        return arithmetic.evaluate(expression)
    except arithmetic.ExpressionError as e:
        raise ToolError(f"calculator: {e}") from None


def calculate(expression: str) -> str:
    """The tool's function: module-level, so that a spawned child process can import it."""
    return format_number(evaluate(expression))


def calculator_tool() -> Tool:
    return Tool("calculator", f"Evaluate an arithmetic expression exactly (integers up to "
                f"{MAX_DIGITS:,} digits). Allowed: {ALLOWED}.",
                {"type": "object", "properties": {"expression": {
                    "type": "string", "description": "e.g. 123 * 456"}}, "required": ["expression"]},
                calculate, isolate=True)
