"""`nanoseek agent`: a task for a model on any OpenAI-compatible endpoint, with tools.

The trajectory (thought, call, observation, answer) is printed as it happens and, with
--trajectory, saved as JSONL; the answer is the last line. Exit code 0 with an answer, 1
when a guard or the endpoint stopped the run first.
"""

from __future__ import annotations

import shlex
from typing import List, Optional

import typer

TOOLS = ("calculator", "python")
IMAGE_BYTES, IMAGE_PIXELS, IMAGE_SIDE = 10 * 2**20, 4096 * 4096, 8192  # text/images.ImageLimits' defaults (PIL not imported here)


def agent_cmd(
    task: str = typer.Argument(..., help="what to do"),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="OPENAI_BASE_URL",
                                 help="the endpoint's /v1 URL (nanoseek serve, vLLM, any OpenAI-compatible API)"),
    model: str = typer.Option(..., help="the model name the endpoint serves"),
    mode: str = typer.Option("auto", help="auto (native tools, text protocol if rejected), native, text"),
    tools: str = typer.Option(",".join(TOOLS), help=f"built-in tools, comma-separated: {', '.join(TOOLS)}"),
    workspace: Optional[str] = typer.Option(None, help="a directory for read_file/write_file/list_files"),
    docs: Optional[str] = typer.Option(None, help="a directory of documents for the search tool"),
    mcp: List[str] = typer.Option([], help="an MCP server command (stdio), e.g. 'python server.py'; repeatable"),
    memory: Optional[str] = typer.Option(None, help="a directory for the persistent vector memory"),
    trajectory: Optional[str] = typer.Option(None, help="save the trajectory as JSONL here"),
    image: List[str] = typer.Option([], help="an image file (or data: URL) given with the task, read under its "
                                        f"own directory within the limits below (and a longest side of "
                                        f"{IMAGE_SIDE} pixels); repeatable"),
    max_image_bytes: int = typer.Option(IMAGE_BYTES, min=1, help="encoded bytes of one image at most"),
    max_image_pixels: int = typer.Option(IMAGE_PIXELS, min=1, help="width * height of one image at most"),
    vision_endpoint: Optional[str] = typer.Option(
        None, help="a vision-capable OpenAI-compatible /v1 URL (loopback unless --vision-remote): the images "
                   "go to it through the look tool, not to --model (for a model that reads text only)"),
    vision_model: Optional[str] = typer.Option(None, help="the vision endpoint's model (default: the first it lists)"),
    vision_max_tokens: int = typer.Option(256, min=1, help="tokens per look reply"),
    vision_timeout: float = typer.Option(60.0, help="seconds per look request"),
    vision_remote: bool = typer.Option(False, "--vision-remote", help="allow a --vision-endpoint that is not loopback"),
    max_steps: int = typer.Option(10, min=1, help="model calls at most"),
    max_repeats: int = typer.Option(1, min=1, help="identical calls run before the next is refused"),
    tool_timeout: float = typer.Option(60.0, help="seconds per tool call"),
    timeout: float = typer.Option(600.0, help="seconds for the whole run"),
    budget: Optional[int] = typer.Option(None, help="token budget for the conversation (old observations shortened)"),
    temperature: float = typer.Option(0.0, help="sampling temperature of the model's replies (0 = greedy)"),
    max_tokens: Optional[int] = typer.Option(None, help="tokens per model reply"),
    unisolated_python: bool = typer.Option(
        False, "--unisolated-python",
        help="where the python tool's sandbox cannot isolate scripts (no root, no unshare), run them "
             "anyway without namespaces: on the host's filesystem, as nobody when root, with rlimits "
             "and seccomp. Without this flag the tool then refuses to run scripts"),
):
    """Run an agent: the model calls tools until it answers (DESIGN.md §6)."""
    from contextlib import ExitStack

    from nanoseek.agent import Agent, ContextBudget, Guards
    from nanoseek.cli.common import check_utf8, fail
    with ExitStack() as stack:
        chosen = _tools(tools, workspace, docs, mcp, tool_timeout, stack, unisolated_python)
        content = check_utf8(task, "task")
        images = _images(image, max_image_bytes, max_image_pixels)
        if vision_endpoint:
            from nanoseek.agent.tools.vision import look_tool
            chosen.append(look_tool(images, vision_endpoint, vision_model, timeout_s=vision_timeout,
                                    max_tokens=vision_max_tokens, max_image_bytes=max_image_bytes,
                                    allow_remote=vision_remote))
        mem = None
        if memory:
            from nanoseek.agent.memory import VectorMemory
            mem = VectorMemory(memory)
        agent = Agent(base_url, model, chosen, mode=mode, echo=typer.echo,
                      guards=Guards(max_steps=max_steps, max_repeats=max_repeats,
                                    total_timeout_s=timeout, tool_timeout_s=tool_timeout),
                      budget=ContextBudget(budget) if budget else None, memory=mem,
                      trajectory_path=trajectory, temperature=temperature, max_tokens=max_tokens)
        traj = agent.run(content, images, images_to_model=not vision_endpoint)
    if traj.answer is None:
        typer.echo(f"no answer: {traj.stop_reason}", err=True)
        raise typer.Exit(1)
    if traj.answer == "":
        fail("the model gave an empty answer")


def _images(specs: list[str], max_bytes: int, max_pixels: int) -> list:
    """The --image values read (agent/images.py); a refusal (a ValueError naming the image
    and the limit) is the CLI's one-line error."""
    from nanoseek.agent.images import read_images
    from nanoseek.text.images import ImageLimits
    return read_images(specs, ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels))


def _tools(names: str, workspace, docs, mcp_commands, timeout, stack, unisolated_python=False) -> list:
    from nanoseek.agent.tools.calculator import calculator_tool
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(TOOLS))
    if unknown:
        raise ValueError(f"--tools: unknown {unknown}; choose from {list(TOOLS)} "
                         "(files come with --workspace, search with --docs, MCP with --mcp)")
    out = [calculator_tool() if n == "calculator" else _python_tool(unisolated_python) for n in wanted]
    if workspace:
        from nanoseek.agent.tools.files import file_tools
        out += file_tools(workspace)
    if docs:
        from nanoseek.agent.tools.search import search_tool
        out.append(search_tool(docs))
    for command in mcp_commands:
        from nanoseek.agent.tools.mcp import MCPServerTools
        argv = shlex.split(command)
        if not argv:
            raise ValueError("--mcp: empty command")
        server = stack.enter_context(MCPServerTools(argv[0], argv[1:], timeout_s=timeout))
        out += server.tools
    return out


def _python_tool(unisolated: bool):
    """The python tool; where its sandbox cannot isolate scripts, say so on stderr now (not
    only in observations): it refuses every script, or with --unisolated-python runs them
    without namespaces."""
    from nanoseek.agent.sandbox import isolation, refusal, unisolated_note
    from nanoseek.agent.tools.python import python_tool
    isolated, why_not = isolation()
    if not isolated:
        msg = (f"warning: python tool: {unisolated_note(why_not)}" if unisolated
               else f"python tool disabled: {refusal(why_not)}")
        typer.echo(msg, err=True)
    return python_tool(allow_unisolated=unisolated)


def register(app: typer.Typer) -> None:
    app.command("agent")(agent_cmd)
