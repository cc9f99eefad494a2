"""A small MCP server for the agent's tests (stdio), written with the mcp SDK's server API."""

from mcp.server.mcpserver import MCPServer

app = MCPServer("nanoseek-test")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@app.tool()
def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


if __name__ == "__main__":
    app.run("stdio")
