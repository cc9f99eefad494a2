"""Running untrusted Python: a subprocess in its own temporary directory, with limits.

What contains the code (on Linux, as root, where `unshare` works — this project's machines):

- wall time: the process group is killed after `wall_s`; CPU time: RLIMIT_CPU;
- memory: RLIMIT_AS (an allocation past it raises MemoryError); files: RLIMIT_FSIZE caps
  every file written, stdout and stderr included; processes: RLIMIT_NPROC;
- namespaces (`unshare --net --pid --mount --ipc --uts --fork --kill-child --mount-proc`): a new
  network namespace with no interface up, so no connection leaves it, not even to
  127.0.0.1; a new PID namespace with its own /proc, so the host's processes are not even
  visible and killing its first process kills every process the code started; a new mount
  namespace in which every mount is read-only (`/run/lock` and the other world-writable
  directories included) except fresh 64 MiB tmpfs over /tmp, /var/tmp and /dev/shm; the
  code's directory is /tmp/work on that tmpfs; new IPC and UTS namespaces, so no System V
  IPC object or message queue is shared with the host or outlives the run;
- the code runs as `nobody` (root ignores RLIMIT_NPROC and file permissions), with
  no_new_privs (set-uid binaries gain nothing) and a seccomp filter (seccomp.py) that
  refuses what a script has no use for: unix and other non-IP sockets, new namespaces,
  mount, ptrace and reading other processes' memory, keyrings, bpf, perf, io_uring, setsid,
  System V IPC and POSIX message queues.

All this is set up by sandbox_boot.py, the namespaces' first process, just before the
script is exec'd. An interpreter that lives under /tmp (a virtualenv there) is bound back
read-only at its own path. `isolation()` checks once, by running a script this way, that
the whole chain works; where it does not (no root, no `unshare`, a container that forbids
namespaces, an architecture the filter does not know, another OS) the python tool REFUSES
to run, unless the caller passes `allow_unisolated=True` (`--unisolated-python`): the code
then still runs as `nobody` when the agent is root, with an environment of five variables
(no API key reaches it), the rlimits, no_new_privs and the seccomp filter with no sockets
at all (setsid refused, so killing its process group kills all it started), but it sees
the host's filesystem — reads what `nobody` may read, writes world-writable directories —
and every result says so in a note. A non-root agent cannot drop privileges: there the
code runs as the agent's user and can read that user's files and processes.

Still not contained, in either mode: reading world-readable files (there is no chroot:
the code sees /etc, /usr, /sys, the repository), CPU and memory side channels, kernel bugs
in the system calls left open; tmpfs pages count towards the machine's memory, not the
script's RLIMIT_AS (three 64 MiB mounts at most).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.agent import seccomp

NOBODY = 65534
BOOT = Path(__file__).with_name("sandbox_boot.py")
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")   # hidden by the namespace's own tmpfs
OPT_IN = "allow_unisolated=True (`nanoseek agent --unisolated-python`)"


class SandboxRefused(RuntimeError):
    """No isolation here and the caller did not opt in to running without it."""


@dataclass
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 8 << 20
    max_output_chars: int = 4000


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    notes: list[str] = field(default_factory=list)

    def observation(self) -> str:
        """What the model reads: the exit status, the output, and any isolation caveat."""
        if self.timed_out:
            head = "killed: wall-clock timeout"
        elif self.exit_code is not None and self.exit_code < 0:
            sig = signal.Signals(-self.exit_code).name
            why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(sig, "")
            head = f"killed by {sig}{why}"
        else:
            head = f"exit code {self.exit_code}"
        parts = [head]
        if self.stdout:
            parts.append(f"stdout:\n{self.stdout}")
        if self.stderr:
            parts.append(f"stderr:\n{self.stderr}")
        return "\n".join(parts + [f"note: {n}" for n in self.notes])


@functools.lru_cache(maxsize=1)
def isolation() -> tuple[bool, str]:
    """(the isolated mode works here, why not): checked once, by running a script in it."""
    why = _cannot_isolate()
    if why:
        return False, why
    python = sandbox_python()
    if python is None:
        return False, f"no Python interpreter that uid {NOBODY} can run ({sys.executable} is not)"
    try:
        r = _execute("print('ok')", SandboxLimits(wall_s=30, cpu_s=10), python, isolated=True)
    except (OSError, SandboxRefused) as e:
        return False, f"the isolated sandbox could not start: {e}"
    if r.exit_code == 0 and r.stdout == "ok\n":
        return True, ""
    return False, f"the isolated sandbox did not start: {(r.stderr or r.observation()).strip()[-300:]}"


def _cannot_isolate() -> str:
    """Why the isolated mode cannot work here, before trying it ('' if it may)."""
    if sys.platform != "linux":
        return f"namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "not root: cannot create network/PID/mount namespaces or drop to nobody"
    if shutil.which("unshare") is None:
        return "the unshare command is missing"
    if seccomp.machine() is None:
        return f"no seccomp filter for this architecture ({os.uname().machine})"
    return ""


@functools.lru_cache(maxsize=1)
def sandbox_python() -> str | None:
    """The interpreter for the code: this one when `nobody` can run it (a virtualenv under
    /root is out of its reach), else the system's python3 — so the code may see only the
    standard library. Without root (no dropping to nobody) it is this one."""
    if os.geteuid() != 0:
        return sys.executable
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            r = subprocess.run([python, "-I", "-c", "pass"], capture_output=True, timeout=30,
                               **_as_nobody())
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return python
    return None


def run_python(code: str, limits: SandboxLimits | None = None, *, python: str | None = None,
               allow_unisolated: bool = False) -> SandboxResult:
    """Run `code` as a script in a fresh directory, under `limits`, with `python` (default:
    `sandbox_python()`). Where the isolated mode does not work, raise SandboxRefused unless
    `allow_unisolated` (then every result carries a note saying what was not isolated)."""
    limits = limits or SandboxLimits()
    isolated, why_not = isolation()
    if not isolated and not allow_unisolated:
        raise SandboxRefused(refusal(why_not))
    python = python or sandbox_python()
    if python is None:
        raise SandboxRefused(f"no Python interpreter that uid {NOBODY} can run")
    result = _execute(code, limits, python, isolated)
    if not isolated:
        result.notes.append(unisolated_note(why_not))
    return result


def refusal(why_not: str) -> str:
    """Why the sandbox will not run code here, and how to opt in to running it anyway."""
    return (f"the python sandbox cannot isolate scripts here ({why_not}), so it runs none; to run "
            f"them without namespaces, on the host's filesystem, pass {OPT_IN}")


def unisolated_note(why_not: str) -> str:
    """What a script run with allow_unisolated was and was not confined by."""
    who = ("nobody" if os.geteuid() == 0 else
           "the agent's own user (it can read that user's files and processes, environments included)")
    net = ("no sockets (seccomp)" if seccomp.machine()
           else "NO seccomp filter on this system: the network is reachable")
    return (f"network and filesystem NOT isolated ({why_not}): the script ran as {who} on the "
            f"host's filesystem with rlimits and {net}")


def _execute(code: str, limits: SandboxLimits, python: str, isolated: bool) -> SandboxResult:
    """One run through sandbox_boot.py, in namespaces or not; the directory is removed."""
    with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-") as root:
        work, logs = Path(root, "work"), Path(root, "logs")
        work.mkdir(mode=0o700)
        logs.mkdir(mode=0o700)
        (work / "main.py").write_text(code, errors="surrogatepass")  # a lone surrogate: a SyntaxError
        if not isolated and os.geteuid() == 0:  # the script's own directory, for nobody
            os.chmod(root, 0o711)  # Python opens the script by its absolute path: let it through
            os.chown(work, NOBODY, NOBODY)
            os.chown(work / "main.py", NOBODY, NOBODY)
        with open(logs / "status", "w") as status:
            cfg = {"isolated": isolated, "uid": NOBODY, "python": python, "status_fd": status.fileno(),
                   "binds": _binds(python) if isolated else [], "seccomp": seccomp.machine() is not None}
            argv = [sys.executable, "-I", str(BOOT), json.dumps(cfg)]
            if isolated:
                argv = ["unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child",
                        "--mount-proc"] + argv
            return _run(argv, work, logs, limits, pass_fds=(status.fileno(),) if isolated else ())


@functools.lru_cache(maxsize=8)
def _binds(python: str) -> list[str]:
    """The directories of `python` (its own, its prefixes) that the namespace's tmpfs would
    hide (a virtualenv under /tmp): sandbox_boot.py binds them back, read-only."""
    q = "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
    try:
        r = subprocess.run([python, "-I", "-c", q], capture_output=True, text=True, timeout=30, **_as_nobody())
        prefixes = json.loads(r.stdout) if r.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        prefixes = []
    dirs = {os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python)),
            *(os.path.abspath(p) for p in prefixes)}
    hidden = sorted(d for d in dirs if any(d == h or d.startswith(h + "/") for h in PRIVATE_DIRS))
    for d in hidden:
        if d in PRIVATE_DIRS:
            raise SandboxRefused(f"the interpreter {python} needs {d} itself, which the sandbox "
                                 "replaces with its own tmpfs: move it into a directory below")
    return [d for d in hidden if not any(d.startswith(o + "/") for o in hidden)]


def _as_nobody() -> dict:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}


def _run(argv: list[str], work: Path, logs: Path, limits: SandboxLimits, pass_fds=()) -> SandboxResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    with open(logs / "stdout", "wb+") as out, open(logs / "stderr", "wb+") as err:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True, pass_fds=pass_fds,
                                preexec_fn=functools.partial(_set_limits, limits))
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)   # unshare dies -> --kill-child kills the namespace's init
            proc.wait()
        _kill_group(proc.pid)        # anything left behind in the fallback mode
        code = proc.returncode
        status = logs / "status"  # the isolated mode's own record of the code's exit status
        if status.exists() and status.read_text().strip():
            code = int(status.read_text())
        return SandboxResult(_read(logs / "stdout", limits.max_output_chars),
                             _read(logs / "stderr", limits.max_output_chars),
                             None if timed_out else code, timed_out)


def _set_limits(limits: SandboxLimits) -> None:
    """In the child before exec: the rlimits, inherited by everything it starts."""
    for res, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                       (resource.RLIMIT_NPROC, limits.max_processes),
                       (resource.RLIMIT_FSIZE, limits.max_file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, max_chars: int) -> str:
    """The file's text, cut to `max_chars` with a note saying how much was dropped."""
    data = path.read_bytes()
    text = data[: max_chars * 4].decode("utf-8", errors="replace")
    if len(text) > max_chars or len(data) > max_chars * 4:
        return text[:max_chars] + f"\n[... output truncated: {len(data):,} bytes in all]"
    return text
