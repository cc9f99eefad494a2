"""Tools from an MCP server (stdio), through the official `mcp` SDK.

The SDK is asynchronous and a session must stay open between calls, so `MCPServerTools`
runs an event loop in a background thread that holds the session; each tool call is sent
to that loop and waited on with a timeout. The server's tools become nanoseek `Tool`s with
the name, description and input schema it lists; an error result (`is_error`) or a failed
call is an observation that starts `error:`.
"""

from __future__ import annotations

import asyncio
import threading

from nanoseek.agent.tools.base import Tool, ToolError


class MCPServerTools:
    """`with MCPServerTools("python", ["server.py"]) as mcp: agent = Agent(..., tools=mcp.tools)`."""

    def __init__(self, command: str, args: list[str] | None = None, env: dict | None = None,
                 timeout_s: float = 60.0, prefix: str = ""):
        self.command, self.args, self.env = command, list(args or []), env
        self.timeout_s, self.prefix = timeout_s, prefix
        self.tools: list[Tool] = []
        self._loop = asyncio.new_event_loop()
        self._ready, self._error = threading.Event(), None
        self._session = self._stop = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp", daemon=True)

    def start(self) -> "MCPServerTools":
        self._thread.start()
        self._main_future = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        if not self._ready.wait(self.timeout_s):
            raise TimeoutError(f"MCP server {self.command} {' '.join(self.args)} did not start "
                               f"within {self.timeout_s:g} s")
        if self._error is not None:
            raise RuntimeError(f"MCP server {self.command} {' '.join(self.args)}: {self._error}") from self._error
        return self

    async def _main(self) -> None:
        from mcp import ClientSession, StdioServerParameters, stdio_client
        self._stop = asyncio.Event()
        try:
            params = StdioServerParameters(command=self.command, args=self.args, env=self.env)
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                self._session = session
                self.tools = [self._wrap(t) for t in listed.tools]
                self._ready.set()
                await self._stop.wait()
        except Exception as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def _wrap(self, t) -> Tool:
        schema = getattr(t, "input_schema", None) or getattr(t, "inputSchema", None) or {"type": "object"}
        return Tool(self.prefix + t.name, t.description or f"the MCP tool {t.name}", schema,
                    lambda **args: self.call(t.name, args), timeout_s=self.timeout_s)

    def call(self, name: str, args: dict) -> str:
        fut = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, args), self._loop)
        try:
            result = fut.result(self.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise ToolError(f"MCP tool {name} did not answer within {self.timeout_s:g} s") from None
        text = "\n".join(getattr(c, "text", None) or f"[{getattr(c, 'type', 'content')}]"
                         for c in result.content)
        if getattr(result, "is_error", False) or getattr(result, "isError", False):
            raise ToolError(f"MCP tool {name}: {text}")
        return text

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            try:
                self._main_future.result(10)
            except Exception:  # noqa: BLE001 - closing: the server may already be gone
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
