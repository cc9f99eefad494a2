"""The `python` tool: a script run in the sandbox (nanoseek/agent/sandbox.py); the model
reads its exit status, stdout and stderr (truncated), and any isolation caveat."""

from __future__ import annotations

from nanoseek.agent.sandbox import SandboxLimits, run_python
from nanoseek.agent.tools.base import Tool


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    limits = limits or SandboxLimits()
    return Tool("python",
                "Run a Python 3 script (standard library only) in a sandbox: no network, its own "
                f"empty directory, {limits.wall_s:g} s wall / {limits.cpu_s} s CPU, "
                f"{limits.memory_bytes >> 20} MiB of memory. Print what you want to see.",
                {"type": "object", "properties": {"code": {"type": "string",
                                                           "description": "the script"}},
                 "required": ["code"]},
                lambda code: run_python(code, limits).observation(),
                timeout_s=limits.wall_s + 30)  # the sandbox kills first; this only guards a hang
