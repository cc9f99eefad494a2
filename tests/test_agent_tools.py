"""The agent's tools one by one: calculator, files confined to a workspace, document search
and vector memory (MiniLM + FAISS), MCP over stdio, and the toolbox's error and timeout
handling — every failure an observation."""

import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from nanoseek.agent.tools.base import Tool, ToolBox, ToolError
from nanoseek.agent.tools.calculator import calculator_tool, evaluate
from nanoseek.agent.tools.files import Workspace, file_tools



# ----------------------------------------------------------------- calculator
def test_calculator_exact_big_integers():
    assert evaluate("123 * 456") == 56088
    assert evaluate("987654321987654321 * 123456789123456789") == 987654321987654321 * 123456789123456789
    assert evaluate("2 ** 200") == 2 ** 200
    assert evaluate("7 / 2") == 3.5 and evaluate("8 / 2") == 4 and isinstance(evaluate("8 / 2"), int)
    assert evaluate("sqrt(16) + abs(-3) + max(1, 2)") == 9.0
    assert evaluate("-(3 - 5) % 3") == 2


@pytest.mark.parametrize("expr,words", [
    ("__import__('os').system('true')", ["not allowed"]),
    ("(1).__class__", ["not allowed"]),
    ("x + 1", ["'x' is not allowed"]),
    ("1 +", ["not an expression"]),
    ("1 / 0", ["division by zero"]),
    ("9 ** 9 ** 9", ["too large"]),
    ("factorial(100000)", ["too large"]),
])
def test_calculator_refuses_with_clear_errors(expr, words):
    with pytest.raises(ToolError) as e:
        evaluate(expr)
    for w in words:
        assert w in str(e.value)


def test_calculator_never_calls_eval(monkeypatch):
    import builtins
    monkeypatch.setattr(builtins, "eval", lambda *a: pytest.fail("eval was called"))
    assert evaluate("2 * 21") == 42


# ---------------------------------------------------------------------- files
def test_files_read_write_list(tmp_path):
    tools = {t.name: t for t in file_tools(tmp_path / "ws")}
    box = ToolBox(list(tools.values()))
    assert box.call("write_file", {"path": "notes/a.txt", "content": "héllo"}).ok
    assert box.call("read_file", {"path": "notes/a.txt"}).text == "héllo"
    assert box.call("list_files", {"path": "notes"}).text == "notes/a.txt (6 bytes)"
    assert box.call("read_file", {"path": str(tmp_path / "ws" / "notes" / "a.txt")}).text == "héllo"


@pytest.mark.parametrize("path", ["../secret.txt", "notes/../../secret.txt", "/etc/passwd",
                                  "link_out/secret.txt", "link_file"])
def test_files_cannot_escape_the_workspace(tmp_path, path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (ws / "link_out").symlink_to(tmp_path)                  # a symlink that points out
    (ws / "link_file").symlink_to(tmp_path / "secret.txt")
    box = ToolBox(file_tools(ws))
    for call in (("read_file", {"path": path}), ("write_file", {"path": path, "content": "pwned"}),
                 ("list_files", {"path": path})):
        obs = box.call(*call)
        assert not obs.ok and obs.text.startswith("error:") and "TOP SECRET" not in obs.text
    assert (tmp_path / "secret.txt").read_text() == "TOP SECRET"


def _outside(tmp_path):
    """A workspace and, next to it, a secret file and a directory holding one."""
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "real.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "real.txt").write_text("TOP SECRET")
    return ws


def _refused(box, path):
    for call in (("read_file", {"path": path}), ("write_file", {"path": path, "content": "pwned"}),
                 ("list_files", {"path": path})):
        obs = box.call(*call)
        assert not obs.ok and obs.text.startswith("error:") and "TOP SECRET" not in obs.text, (call, obs)


@pytest.mark.parametrize("name,target", [
    ("abs_out", "{tmp}/secret.txt"), ("rel_out", "../secret.txt"), ("rel_in", "real.txt"),
    ("abs_in", "{tmp}/ws/real.txt"), ("dir_abs", "{tmp}/outdir"), ("dir_rel", "../outdir"),
    ("dir_in", "sub")])
def test_files_refuse_every_symlink(tmp_path, name, target):
    ws = _outside(tmp_path)
    (ws / name).symlink_to(target.format(tmp=tmp_path))
    box = ToolBox(file_tools(ws))
    path = f"{name}/real.txt" if name.startswith("dir") else name  # a link as a directory component
    _refused(box, path)
    obs = box.call("read_file", {"path": path})
    assert "symbolic link" in obs.text, obs.text
    assert (tmp_path / "secret.txt").read_text() == "TOP SECRET"
    assert (ws / "real.txt").read_text() == "inside"


def test_files_refuse_a_planted_hard_link(tmp_path):
    ws = _outside(tmp_path)
    os.link(tmp_path / "secret.txt", ws / "notes.txt")   # planted before the agent runs
    box = ToolBox(file_tools(ws))
    for call in (("read_file", {"path": "notes.txt"}), ("write_file", {"path": "notes.txt", "content": "pwned"})):
        obs = box.call(*call)
        assert not obs.ok and "hard link" in obs.text and "TOP SECRET" not in obs.text, obs.text
    assert (tmp_path / "secret.txt").read_text() == "TOP SECRET"


def test_files_refuse_fifos_and_devices_without_blocking(tmp_path):
    ws = _outside(tmp_path)
    os.mkfifo(ws / "fifo")
    if os.geteuid() == 0:
        os.mknod(ws / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero: endless
    box = ToolBox(file_tools(ws), timeout_s=5)
    for name in ("fifo", "zero") if os.geteuid() == 0 else ("fifo",):
        for call in (("read_file", {"path": name}), ("write_file", {"path": name, "content": "x"})):
            obs = box.call(*call)
            assert not obs.ok and "not a regular file" in obs.text, (call, obs.text)


def test_files_read_a_bounded_amount(tmp_path):
    import tracemalloc
    ws = _outside(tmp_path)
    with open(ws / "big.txt", "wb") as f:
        f.truncate(256 << 20)                 # 256 MiB, sparse
    tracemalloc.start()
    try:
        text = Workspace(ws).read("big.txt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text.endswith("[... truncated: the file is 268,435,456 bytes]")
    assert peak < 4 << 20, peak


@pytest.mark.parametrize("component", ["file", "directory"])
def test_files_symlink_swap_race_never_leaks(tmp_path, component):
    """A writer swaps a regular file (or directory) and a symlink pointing out, as fast as it
    can, while the tool reads in a loop: the outside file must never come back."""
    ws = _outside(tmp_path)
    (ws / "d").mkdir()
    (ws / "d" / "real.txt").write_text("inside")
    target, path = ((tmp_path / "secret.txt", "x") if component == "file" else (tmp_path / "outdir", "d/real.txt"))
    stop, reads, leaks = threading.Event(), [0], []

    def swap():
        while not stop.is_set():
            if component == "file":
                (ws / "x.tmp").write_text("inside")
                os.replace(ws / "x.tmp", ws / "x")
                os.symlink(target, ws / "x.lnk")
                os.replace(ws / "x.lnk", ws / "x")
            else:
                os.rename(ws / "d", ws / "d.real")
                os.symlink(target, ws / "d")
                time.sleep(0.0002)
                os.unlink(ws / "d")
                os.rename(ws / "d.real", ws / "d")
                time.sleep(0.0002)

    wsp = Workspace(ws)
    th = threading.Thread(target=swap, daemon=True)
    th.start()
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            try:
                out = wsp.read(path)
            except (ToolError, OSError):   # refused, or caught mid-swap: not a leak
                continue
            reads[0] += 1
            if "TOP SECRET" in out:
                leaks.append(out)
    finally:
        stop.set()
        th.join()
    assert leaks == [], f"{len(leaks)} leaks in {reads[0]} reads"


# -------------------------------------------------------------------- toolbox
def test_toolbox_turns_every_failure_into_an_observation():
    def crash():
        raise RuntimeError("kaput")
    box = ToolBox([Tool("crash", "", {"type": "object"}, crash),
                   Tool("slow", "", {"type": "object"}, lambda: time.sleep(5) or "late", timeout_s=0.2)])
    assert box.call("crash", "{}").text == "error: crash failed: RuntimeError: kaput"
    assert "timed out" in box.call("slow", {}).text
    assert box.call("crash", "[1]").text.startswith("error: the arguments of crash must be a JSON object")
    assert box.call("crash", '{"x": 1}').text.startswith("error: crash:")  # unexpected argument


def test_two_tools_with_one_name_are_refused():
    with pytest.raises(ValueError, match="calculator"):
        ToolBox([calculator_tool(), calculator_tool()])


# ------------------------------------------------------- search and memory
DOCS = {"mla.md": "Multi-head latent attention compresses keys and values into a low-rank latent "
                  "vector, which shrinks the KV cache.",
        "moe.md": "DeepSeekMoE routes each token to a few fine-grained experts and keeps shared "
                  "experts that every token uses.",
        "cooking.txt": "Boil the pasta in salted water for nine minutes, then drain it."}


def test_search_finds_the_relevant_document(tmp_path):
    from nanoseek.agent.tools.search import search_tool
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text)
    tool = search_tool(tmp_path, k=1)
    out = tool.fn(query="How is the key-value cache made smaller?")
    assert out.startswith("[mla.md #0") and "latent" in out
    assert tool.fn(query="how long to cook spaghetti", top_k=1).startswith("[cooking.txt")


def test_vector_memory_persists_across_runs(tmp_path):
    from nanoseek.agent.memory import VectorMemory
    m = VectorMemory(tmp_path)
    m.add("The user's favourite prime is 7919.")
    m.add("Pasta cooks in nine minutes.")
    again = VectorMemory(tmp_path)  # a new run: loaded from disk
    assert len(again) == 2
    assert again.recall("Which prime number does the user like?", k=1) == ["The user's favourite prime is 7919."]


def test_agent_stores_and_recalls_memories(tmp_path):
    from nanoseek.agent import Agent
    from nanoseek.agent.memory import VectorMemory
    from tests.agent_mock import mock_endpoint
    with mock_endpoint(lambda body: {"content": "Paris."}) as (url, requests):
        Agent(url, "m", memory=VectorMemory(tmp_path), echo=None).run("What is the capital of France?")
        traj = Agent(url, "m", memory=VectorMemory(tmp_path), echo=None).run("Capital city of France?")
    assert "From earlier runs" not in requests[0]["messages"][0]["content"]
    assert "Task: What is the capital of France?\nAnswer: Paris." in requests[1]["messages"][0]["content"]
    assert traj.of_type("note")[0]["content"] == "recalled 1 memories"


# ------------------------------------------------------------------------ MCP
SERVER = Path(__file__).with_name("agent_mcp_server.py")


def test_mcp_tools_over_stdio():
    from nanoseek.agent.tools.mcp import MCPServerTools
    with MCPServerTools(sys.executable, [str(SERVER)], timeout_s=60) as mcp:
        box = ToolBox(mcp.tools)
        assert sorted(box.tools) == ["add", "fail", "shout"]
        assert box.tools["add"].parameters["required"] == ["a", "b"]
        assert box.call("add", {"a": 2, "b": 40}).text == "42"
        assert box.call("shout", {"text": "héllo"}).text == "HÉLLO"
        failed = box.call("fail", {"reason": "no luck"})
        assert not failed.ok and failed.text.startswith("error: MCP tool fail:")
        bad = box.call("add", {"a": "two"})
        assert not bad.ok and bad.text.startswith("error:")


def test_mcp_server_that_cannot_start_is_a_clear_error():
    from nanoseek.agent.tools.mcp import MCPServerTools
    with pytest.raises((RuntimeError, OSError), match="no-such"):
        MCPServerTools("/no-such-mcp-server", timeout_s=20).start()
