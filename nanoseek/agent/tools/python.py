"""The `python` tool: a script run in the sandbox (nanoseek/agent/sandbox.py); the model
reads its exit status, stdout and stderr (truncated), and any isolation caveat.

Where the sandbox cannot isolate scripts, every call is refused (an `error:` observation
saying why) unless the tool was made with `allow_unisolated=True`
(`nanoseek agent --unisolated-python`)."""

from __future__ import annotations

from nanoseek.agent.sandbox import SandboxLimits, SandboxRefused, run_python
from nanoseek.agent.tools.base import Tool, ToolError


def python_tool(limits: SandboxLimits | None = None, *, allow_unisolated: bool = False,
                python: str | None = None) -> Tool:
    limits = limits or SandboxLimits()

    def run(code: str) -> str:
        if not isinstance(code, str):
            raise ToolError(f"code: give the script as a string, not {type(code).__name__}")
        try:
            return run_python(code, limits, python=python, allow_unisolated=allow_unisolated).observation()
        except SandboxRefused as e:
            raise ToolError(str(e)) from None

    return Tool("python",
                "Run a Python 3 script (standard library only) in a sandbox: no network, its own "
                f"empty directory, {limits.wall_s:g} s wall / {limits.cpu_s} s CPU, "
                f"{limits.memory_bytes >> 20} MiB of memory. Print what you want to see.",
                {"type": "object", "properties": {"code": {"type": "string",
                                                           "description": "the script"}},
                 "required": ["code"]},
                run,
                timeout_s=limits.wall_s + 30)  # the sandbox kills first; this only guards a hang
