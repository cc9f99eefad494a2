"""Escape attempts against the Python sandbox: each is contained and comes back as an
observation. Where the OS refuses namespaces (not root, no unshare) the isolation tests are
skipped and the caveat that every observation then carries is checked instead."""

import os
import socket
import time

import pytest

from nanoseek.agent.sandbox import SandboxLimits, isolation, run_python
from nanoseek.agent.tools.base import ToolBox
from nanoseek.agent.tools.python import python_tool

ISOLATED, WHY_NOT = isolation()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"no namespaces here: {WHY_NOT}")
FAST = SandboxLimits(wall_s=5, cpu_s=2, memory_bytes=512 << 20)


def test_runs_code_in_its_own_directory():
    r = run_python("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.listdir('.'))", FAST)
    assert r.exit_code == 0 and r.stdout.startswith("hi ['") and "a.txt" in r.stdout
    again = run_python("import os; print(os.listdir('.'))", FAST)
    assert "a.txt" not in again.stdout  # a fresh directory each run


@needs_isolation
def test_no_network_even_to_localhost():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('CONNECTED')"
        r = run_python(code, FAST)
    assert "CONNECTED" not in r.stdout and r.exit_code == 1
    assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr


@needs_isolation
def test_cannot_read_or_write_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    os.chmod(secret, 0o600)
    outside = tmp_path / "planted.txt"
    code = (f"try:\n    print(open({str(secret)!r}).read())\nexcept OSError as e:\n    print('read', type(e).__name__)\n"
            f"for p in ({str(outside)!r}, '/tmp/nanoseek_escape_probe', '/etc/nanoseek_probe'):\n"
            "    try:\n        open(p, 'w').write('x'); print('wrote', p)\n"
            "    except OSError as e:\n        print('write', type(e).__name__)\n")
    r = run_python(code, FAST)
    # the test's tmp_path is under /tmp, hidden by the sandbox's own tmpfs; elsewhere (/root)
    # file permissions stop `nobody`
    assert "TOP SECRET" not in r.stdout and "read FileNotFoundError" in r.stdout
    r = run_python("import os\ntry:\n    print(os.listdir('/root'))\nexcept OSError as e:\n    print(type(e).__name__)", FAST)
    assert r.stdout.strip() == "PermissionError"
    assert not outside.exists() and not os.path.exists("/etc/nanoseek_probe")
    assert not os.path.exists("/tmp/nanoseek_escape_probe")  # its /tmp is a private tmpfs


def test_infinite_loop_is_killed():
    r = run_python("while True:\n    pass", SandboxLimits(wall_s=3, cpu_s=1))
    assert r.timed_out or r.exit_code == -9 or r.exit_code == -24  # wall clock or SIGXCPU
    assert r.observation().startswith("killed")


def test_memory_hog_is_refused():
    r = run_python("x = bytearray(4 << 30)\nprint('ALLOCATED')", FAST)
    assert "ALLOCATED" not in r.stdout and "MemoryError" in r.stderr


@needs_isolation
def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(code, SandboxLimits(wall_s=3, cpu_s=2, max_processes=16))
    assert r.timed_out or r.exit_code is not None
    # every process of the PID namespace dies with it (the kernel reaps them asynchronously)
    for _ in range(100):
        left = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == 65534 and _is_python(p)]
        if not left:
            break
        time.sleep(0.1)
    assert left == []


def test_output_is_truncated():
    r = run_python("print('a' * 100000)", SandboxLimits(max_output_chars=500))
    assert len(r.stdout) < 600 and "output truncated: 100,001 bytes" in r.stdout


def test_errors_and_caveats_reach_the_model_as_observations():
    box = ToolBox([python_tool(FAST)])
    obs = box.call("python", {"code": "raise SystemExit(3)"})
    assert obs.ok and obs.text.startswith("exit code 3")
    obs = box.call("python", {"code": "1/0"})
    assert "ZeroDivisionError" in obs.text
    assert ("NOT isolated" in obs.text) == (not ISOLATED)


def _uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except OSError:
        return None


def _is_python(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"main.py" in f.read()
    except OSError:
        return False
