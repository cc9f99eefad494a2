"""A tool, and the toolbox that calls tools for the loop.

A tool is a name, a description and a JSON schema for its arguments (what the model sees,
in OpenAI's `tools` shape) plus a Python function that returns the observation as text.
`ToolBox.call` is the one place a call runs: whatever goes wrong (unknown tool, arguments
that are not JSON, a missing argument, an exception, a timeout) comes back as an
observation that starts `error:`, so the model can correct itself and the loop never
crashes on a tool.

Timeouts. A tool runs in a daemon thread that is waited on for its time; a thread cannot be
stopped, so this limit holds only for work that lets the GIL go (I/O, waiting on a
subprocess: the python tool's sandbox and MCP servers kill their own work at their own
limits). A tool whose function could hold the GIL in C code for long (big-integer
arithmetic, a regex) sets `isolate=True`: it then runs in a child process that is killed at
the deadline (nanoseek/agent/tools/isolation.py), so no expression can stop the agent.
Isolated functions must be pure (side effects stay in the child) and return picklable
values; the calculator is one.
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
    isolate: bool = False                 # run fn in a child process killed at the timeout
    sees: list | None = None              # a vision tool's images (agent/images.AgentImage), which it picks from

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
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting too deep
            return Observation(f"error: the arguments of {name} cannot be read ({type(e).__name__}: "
                               f"{str(e)[:200]})", False)
        if not isinstance(args, dict):
            return Observation(f"error: the arguments of {name} must be a JSON object, got "
                               f"{type(args).__name__}: {str(arguments)[:200]}", False)
        timeout_s = tool.timeout_s or self.timeout_s
        run = _run_isolated if tool.isolate else _run_in_thread
        return run(tool, args, timeout_s)


def _observe(tool: Tool, args: dict) -> Observation:
    """Call the tool's function; whatever it raises becomes an error observation."""
    try:
        return Observation(str(tool.fn(**args)), True)
    except ToolError as e:
        return Observation(f"error: {e}", False)
    except TypeError as e:  # a missing or unexpected argument
        return Observation(f"error: {tool.name}: {e}; parameters: {json.dumps(tool.parameters)}", False)
    except Exception as e:  # noqa: BLE001 - a tool's bug is still an observation
        return Observation(f"error: {tool.name} failed: {type(e).__name__}: {e}", False)


def _timed_out(tool: Tool, timeout_s: float) -> Observation:
    return Observation(f"error: {tool.name} did not finish within {timeout_s:g} s (timed out)", False)


def _run_in_thread(tool: Tool, args: dict, timeout_s: float) -> Observation:
    """The tool in a daemon thread, waited on for `timeout_s`. A thread cannot be killed:
    a tool that overruns is abandoned (its result ignored), which is a real limit only
    while it lets the GIL go (see the module's docstring)."""
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("out", _observe(tool, args)),
                          name=f"tool-{tool.name}", daemon=True)
    th.start()
    th.join(timeout_s)
    return _timed_out(tool, timeout_s) if th.is_alive() else box["out"]


def _run_isolated(tool: Tool, args: dict, timeout_s: float) -> Observation:
    """The tool in a child process, killed (with anything it started) at `timeout_s`."""
    from nanoseek.agent.tools.isolation import ChildDied, ChildTimeout, run_in_child
    try:
        return run_in_child(_observe, (tool, args), timeout_s)
    except ChildTimeout:
        return _timed_out(tool, timeout_s)
    except ChildDied as e:
        return Observation(f"error: {tool.name}'s process stopped: {e}", False)
    except Exception as e:  # noqa: BLE001 - no process (fork refused, nothing to pickle)
        return Observation(f"error: {tool.name} could not run in its own process: "
                           f"{type(e).__name__}: {e}", False)
