"""A tool, and the toolbox that calls tools for the loop.

A tool is a name, a description and a JSON schema for its arguments (what the model sees,
in OpenAI's `tools` shape) plus a Python function that returns the observation as text.
`ToolBox.call` is the one place a call runs: whatever goes wrong (unknown tool, arguments
that are not JSON, a missing argument, an exception, a timeout) comes back as an
observation that starts `error:`, so the model can correct itself and the loop never
crashes on a tool.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass


class ToolError(Exception):
    """An error meant for the model: its message becomes the observation."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                      # JSON schema of the arguments object
    fn: Callable[..., str]                # called with the arguments as keywords
    timeout_s: float | None = None        # this tool's own limit (else the toolbox's)

    def spec(self) -> dict:
        """OpenAI's `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class Observation:
    text: str
    ok: bool


class ToolBox:
    """The tools of one agent, by name."""

    def __init__(self, tools: list[Tool], timeout_s: float = 60.0):
        self.tools = {}
        for t in tools:
            if t.name in self.tools:
                raise ValueError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        self.timeout_s = timeout_s

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def call(self, name: str, arguments: str | dict) -> Observation:
        """Run one call; every failure is an observation, never an exception."""
        tool = self.tools.get(name)
        if tool is None:
            return Observation(f"error: no tool named {name!r}; the tools are {sorted(self.tools)}", False)
        try:
            args = json.loads(arguments or "{}") if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as e:
            return Observation(f"error: the arguments of {name} are not JSON ({e.msg} at "
                               f"character {e.pos}): {str(arguments)[:200]}", False)
        if not isinstance(args, dict):
            return Observation(f"error: the arguments of {name} must be a JSON object, got {args!r}"[:300], False)
        return _run_with_timeout(tool, args, tool.timeout_s or self.timeout_s)


def _run_with_timeout(tool: Tool, args: dict, timeout_s: float) -> Observation:
    """The tool in a daemon thread, waited on for `timeout_s`. A thread cannot be killed:
    a tool that overruns is abandoned (its result ignored); tools that can run long (the
    sandbox, MCP) also enforce their own limit, so nothing keeps running for real."""
    box: dict = {}

    def target():
        try:
            box["out"] = Observation(str(tool.fn(**args)), True)
        except ToolError as e:
            box["out"] = Observation(f"error: {e}", False)
        except TypeError as e:  # a missing or unexpected argument
            box["out"] = Observation(f"error: {tool.name}: {e}; parameters: "
                                     f"{json.dumps(tool.parameters)}", False)
        except Exception as e:  # noqa: BLE001 - a tool's bug is still an observation
            box["out"] = Observation(f"error: {tool.name} failed: {type(e).__name__}: {e}", False)

    th = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        return Observation(f"error: {tool.name} did not finish within {timeout_s:g} s (timed out)", False)
    return box["out"]
