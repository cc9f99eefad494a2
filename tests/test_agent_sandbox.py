"""Escape attempts against the Python sandbox: each is contained and comes back as an
observation. Where the OS refuses namespaces (not root, no unshare) the isolation tests are
skipped; the tests of limits then run with `allow_unisolated=True`, and the refusal without
it (and what still holds with it) is tested everywhere by simulating a missing `unshare`."""

import os
import socket
import time

import pytest

from nanoseek.agent import sandbox
from nanoseek.agent.sandbox import SandboxLimits, isolation, run_python
from nanoseek.agent.tools.base import ToolBox
from nanoseek.agent.tools.python import python_tool

ISOLATED, WHY_NOT = isolation()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"no namespaces here: {WHY_NOT}")
FAST = SandboxLimits(wall_s=5, cpu_s=2, memory_bytes=512 << 20)


def run(code, limits=FAST):
    """The limits hold in both modes: tested wherever the tests run."""
    return run_python(code, limits, allow_unisolated=True)


def test_runs_code_in_its_own_directory():
    r = run("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.listdir('.'))")
    assert r.exit_code == 0 and r.stdout.startswith("hi ['") and "a.txt" in r.stdout
    again = run("import os; print(os.listdir('.'))")
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
    r = run("while True:\n    pass", SandboxLimits(wall_s=3, cpu_s=1))
    assert r.timed_out or r.exit_code == -9 or r.exit_code == -24  # wall clock or SIGXCPU
    assert r.observation().startswith("killed")


def test_memory_hog_is_refused():
    r = run("x = bytearray(4 << 30)\nprint('ALLOCATED')")
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
    r = run("print('a' * 100000)", SandboxLimits(max_output_chars=500))
    assert len(r.stdout) < 600 and "output truncated: 100,001 bytes" in r.stdout


def test_errors_and_caveats_reach_the_model_as_observations():
    box = ToolBox([python_tool(FAST, allow_unisolated=True)])
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


# --------------------------------------------------------------- no isolation: refuse or opt in
ROOT = os.geteuid() == 0
AGENT_PID = os.getpid()


@pytest.fixture
def no_isolation(monkeypatch):
    """The sandbox as it behaves where the OS refuses namespaces."""
    monkeypatch.setattr(sandbox, "isolation", lambda: (False, "simulated: unshare refused"))


def test_isolation_probe_notices_a_missing_unshare(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare, no mount on the PATH
    sandbox.isolation.cache_clear()
    try:
        ok, why = sandbox.isolation()
    finally:
        monkeypatch.undo()
        sandbox.isolation.cache_clear()
    assert not ok and "unshare" in why


def test_without_isolation_the_tool_refuses_to_run(no_isolation, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(sandbox.SandboxRefused) as e:
        run_python(f"open({str(marker)!r}, 'w')", FAST)
    assert "simulated: unshare refused" in str(e.value) and "allow_unisolated" in str(e.value)
    obs = ToolBox([python_tool(FAST)]).call("python", {"code": f"open({str(marker)!r}, 'w')"})
    assert not obs.ok and obs.text.startswith("error:") and "--unisolated-python" in obs.text
    assert not marker.exists()


@pytest.mark.skipif(not ROOT, reason="dropping to nobody needs root")
def test_unisolated_opt_in_still_drops_to_nobody_and_scrubs_the_environment(no_isolation, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-nanoseek-test-secret")
    code = f"""import os, socket
print("ids", os.getuid(), os.getgid(), os.getgroups())
print("env", sorted(os.environ))
print(open("/proc/self/environ").read())
for p in ("/etc/shadow", f"/proc/{{os.getppid()}}/environ", "/proc/{AGENT_PID}/environ"):
    try:
        print("LEAKED", p, open(p).read()[:100])
    except OSError as e:
        print("refused", p, type(e).__name__)
for what, f in (("kill", lambda: os.kill({AGENT_PID}, 0)), ("socket", socket.socket),
                ("setsid", os.setsid)):
    try:
        f(); print("ALLOWED", what)
    except OSError as e:
        print("refused", what, type(e).__name__)
print(open("/proc/self/status").read())
"""
    r = run_python(code, FAST, allow_unisolated=True)
    assert r.exit_code == 0, r.stderr
    assert "ids 65534 65534 []" in r.stdout
    assert "sk-nanoseek-test-secret" not in r.stdout and "OPENAI" not in r.stdout
    assert "LEAKED" not in r.stdout and "ALLOWED" not in r.stdout
    assert r.stdout.count("refused") == 6
    assert "NoNewPrivs:\t1" in r.stdout
    assert any("NOT isolated" in n for n in r.notes)


@pytest.mark.skipif(not ROOT, reason="dropping to nobody needs root")
def test_unisolated_run_leaves_no_process_behind(no_isolation):
    code = ("import subprocess\nsubprocess.Popen(['sleep', '271.828'])\n"
            "try:\n    subprocess.Popen(['sleep', '271.829'], start_new_session=True)\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n")
    r = run_python(code, FAST, allow_unisolated=True)
    assert "refused PermissionError" in r.stdout, r.stderr
    for _ in range(50):
        left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(b"sleep\x00271.82")]
        if not left:
            break
        time.sleep(0.1)
    assert left == []


# ------------------------------------------------------------------ inside the namespaces
@needs_isolation
def test_filesystem_is_read_only_but_its_private_mounts():
    probe = f"nanoseek_probe_{os.getpid()}"
    code = f"""import os
for d in ("/run/lock", "/var/lock", "/etc", "/usr", "/var/tmp", "/dev/shm", "/tmp", "."):
    try:
        open(os.path.join(d, {probe!r}), "w").write("x"); print("wrote", d)
    except OSError as e:
        print("refused", d, e.strerror)
top = dict()  # mount point -> options of the mount seen there (a later one covers an earlier)
for line in open("/proc/self/mountinfo"):
    f = line.split()
    top[f[4]] = f[5].split(",")
print("rw mounts", sorted(m for m, o in top.items() if "ro" not in o))
"""
    try:
        r = run_python(code, FAST)
    finally:
        for d in ("/run/lock", "/etc", "/usr"):
            if os.path.exists(os.path.join(d, probe)):
                os.unlink(os.path.join(d, probe))   # a sandbox that failed: leave nothing
                pytest.fail(f"the script wrote {d}/{probe} on the host")
    assert r.exit_code == 0, r.stderr
    for d in ("/run/lock", "/var/lock", "/etc", "/usr"):
        assert f"refused {d} Read-only file system" in r.stdout
        assert not os.path.exists(os.path.join(d, probe))
    for d in ("/var/tmp", "/dev/shm", "/tmp", "."):
        assert f"wrote {d}" in r.stdout
        assert not os.path.exists(os.path.join(d if d != "." else "/tmp/work", probe))
    rw = r.stdout.split("rw mounts ")[1].strip()
    assert rw == "['/dev/shm', '/tmp', '/var/tmp']", rw  # /tmp/work lies inside /tmp's tmpfs


@needs_isolation
def test_host_unix_socket_cannot_be_reached():
    path = f"/run/lock/nanoseek-test-{os.getpid()}.sock"   # world-writable, seen (read-only) inside
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        server.setblocking(False)
        try:
            code = f"""import socket
for make in (lambda: socket.socket(socket.AF_UNIX), lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0]):
    try:
        s = make(); s.connect({path!r}); s.send(b"hi"); print("CONNECTED")
    except OSError as e:
        print("refused", type(e).__name__)
a, b = socket.socketpair(); a.send(b"ok"); print("pair", b.recv(2))
"""
            r = run_python(code, FAST)
            with pytest.raises(BlockingIOError):
                server.accept()
        finally:
            os.unlink(path)
    assert r.stdout.split("\n")[:3] == ["refused PermissionError"] * 2 + ["pair b'ok'"], r.stdout + r.stderr


@needs_isolation
def test_namespaces_mounts_and_ptrace_are_refused():
    from nanoseek.agent import seccomp
    nrs = seccomp.syscall_numbers()
    code = f"""import ctypes, errno, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
nrs = {nrs!r}
def call(name, *args):
    r = libc.syscall(nrs[name], *[ctypes.c_ulong(a) for a in args])
    if r == 0 and name == "clone":
        os._exit(0)   # the child, had the call worked
    return errno.errorcode.get(ctypes.get_errno(), "OK") if r < 0 else "OK"
for name, args in (("unshare", (0x10000000,)), ("unshare", (0x20000,)), ("setns", (0, 0)),
                   ("clone", (0x10000000 | 17, 0, 0, 0, 0)), ("mount", (0, 0, 0, 0, 0)),
                   ("umount2", (0, 0)), ("pivot_root", (0, 0)), ("ptrace", (16, 1, 0, 0)),
                   ("process_vm_readv", (1, 0, 0, 0, 0, 0)), ("keyctl", (0, 0)), ("bpf", (0, 0, 0)),
                   ("perf_event_open", (0, 0, 0, 0, 0)), ("io_uring_setup", (1, 0)),
                   ("userfaultfd", (0,)), ("clone3", (0, 0))):
    print(name, call(name, *args))
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", subprocess.run(["true"]).returncode, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
import threading
t = threading.Thread(target=print, args=("thread", "ok"))
t.start(); t.join()
"""
    r = run_python(code, FAST)
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert r.exit_code == 0, r.stderr
    for name in ("unshare", "setns", "clone", "mount", "umount2", "pivot_root", "ptrace",
                 "process_vm_readv", "keyctl", "bpf", "perf_event_open", "io_uring_setup", "userfaultfd"):
        assert lines[name] == "EPERM", (name, r.stdout)
    assert lines["clone3"] == "ENOSYS"           # so libc falls back to clone, which is checked
    assert lines["fork"] == "0 7" and lines["thread"] == "ok"   # processes and threads still work


@needs_isolation
def test_proc_shows_only_the_sandbox_and_no_new_privs_is_set():
    code = ("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(open('/proc/self/status').read())")
    r = run_python(code, FAST)
    pids = eval(r.stdout.splitlines()[0])
    assert len(pids) == 2 and pids[0] == 1, r.stdout  # the namespace's init (the bootstrap), the script
    assert "NoNewPrivs:\t1" in r.stdout and "Seccomp:\t2" in r.stdout


@needs_isolation
def test_an_interpreter_under_tmp_is_bound_in():
    import subprocess
    import tempfile
    venv = tempfile.mkdtemp(prefix="nanoseek-venv-", dir="/tmp")
    try:
        os.chmod(venv, 0o755)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", venv], check=True)
        r = run_python("import sys\nprint(sys.prefix)", FAST, python=f"{venv}/bin/python")
        assert r.exit_code == 0 and r.stdout.strip() == venv, r.stderr
    finally:
        import shutil
        shutil.rmtree(venv)


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# ---------------------------------------------------------------------------- the agent CLI
def _python_model(body: dict) -> dict:
    """Runs one script with the python tool, then answers with what came back."""
    from tests.agent_mock import call
    msgs = body["messages"]
    if msgs[-1]["role"] == "tool":
        return {"content": f"Result: {msgs[-1]['content']}"}
    return {"content": "", "tool_calls": [call("python", {"code": "import os; print('uid', os.getuid())"})]}


@pytest.mark.parametrize("opt_in", [False, True])
def test_agent_says_at_start_up_that_scripts_are_not_isolated(no_isolation, opt_in):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    from tests.agent_mock import mock_endpoint
    with mock_endpoint(_python_model) as (url, _):
        res = CliRunner().invoke(app, ["agent", "--base-url", url, "--model", "mock", "--tools", "python"]
                                 + ["--unisolated-python"] * opt_in + ["run a script"])
    assert res.exit_code == 0, res.output
    first = res.stderr.splitlines()[0]  # before the run's first step
    assert "simulated: unshare refused" in first
    if opt_in:
        assert first.startswith("warning: python tool: network and filesystem NOT isolated")
        assert "uid 65534" in res.stdout or not ROOT
    else:
        assert first.startswith("python tool disabled:") and "--unisolated-python" in first
        assert "error: the python sandbox cannot isolate scripts here" in res.stdout


IPC_PROBE = """import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    print(name, errno.errorcode.get(ctypes.get_errno(), "OK") if r < 0 else "OK")
call("shmget", 0x5eed, 1 << 20, 0o1666)
call("msgget", 0x5eee, 0o1666)
call("semget", 0x5eef, 1, 0o1666)
call("shmat", 0, None, 0)
call("mq_open", b"/nanoseek-probe", 0o100 | 2, 0o666, None)
"""


def _host_ipc_keys():
    keys = set()
    for f in ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem"):
        if os.path.exists(f):
            with open(f) as lines:
                keys |= {int(line.split()[0]) for line in list(lines)[1:] if line.split()}
    return keys


@pytest.mark.parametrize("mode", ["isolated", "unisolated"])
def test_system_v_ipc_and_message_queues_are_refused(mode, monkeypatch):
    """A segment or queue made by one script outlived it on the host, for the next run."""
    if mode == "isolated" and not ISOLATED:
        pytest.skip(WHY_NOT)
    if mode == "unisolated":
        monkeypatch.setattr(sandbox, "isolation", lambda: (False, "simulated: unshare refused"))
    r = run_python(IPC_PROBE, FAST, allow_unisolated=True)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["shmget", "EPERM", "msgget", "EPERM", "semget", "EPERM",
                                "shmat", "EPERM", "mq_open", "EPERM"], r.stdout
    assert not {0x5eed, 0x5eee, 0x5eef} & _host_ipc_keys()
    assert not os.path.exists("/dev/mqueue/nanoseek-probe")
