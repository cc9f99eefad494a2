"""Running untrusted Python: a subprocess in its own temporary directory, with limits.

What contains the code (on Linux, as root, where `unshare` works — this project's machines):

- wall time: the process group is killed after `wall_s`; CPU time: RLIMIT_CPU;
- memory: RLIMIT_AS (an allocation past it raises MemoryError); files: RLIMIT_FSIZE caps
  every file written, stdout and stderr included; processes: RLIMIT_NPROC;
- namespaces (`unshare --net --pid --mount --fork --kill-child`): a new network namespace
  with no interface up, so no connection leaves it, not even to 127.0.0.1; a new PID
  namespace, so killing its first process kills every process the code started (a fork
  bomb dies with it); a new mount namespace where fresh tmpfs hide /tmp, /var/tmp and
  /dev/shm, so the world-writable directories the code could write are its own;
- the code runs as `nobody` (root ignores RLIMIT_NPROC and file permissions), in a 0700
  directory of its own that is deleted afterwards.

Where the OS refuses namespaces (no root, a seccomp profile, another OS) the code still
runs with the rlimits and its own directory, and every result says, in its observation,
that the network and the filesystem are NOT isolated. What is never contained: reading
world-readable files (there is no chroot), CPU and memory side channels, kernel bugs.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
# run inside the namespaces as root: hide the shared writable directories, show the code's
# directory as /tmp/work, drop to nobody, run main.py
_BOOTSTRAP = """
import os, subprocess, sys
uid, python = int(sys.argv[1]), sys.argv[2]
status = open(sys.argv[3], "w")  # opened before /tmp is hidden below
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
for d in ("/tmp", "/var/tmp", "/dev/shm"):
    if os.path.isdir(d):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", d], check=True)
os.mkdir("/tmp/work")  # the code's directory, seen again under the new /tmp
subprocess.run(["mount", "--bind", "/proc/self/cwd", "/tmp/work"], check=True)
os.chdir("/tmp/work")


def drop():
    os.setgroups([]); os.setgid(uid); os.setuid(uid)


# the code runs as a child of this namespace's init and its status is written here: unshare
# re-raising a child's fatal signal itself is unreliable (it can fail in sigprocmask)
status.write(str(subprocess.run([python, "-I", "main.py"], preexec_fn=drop).returncode))
status.close()
"""


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
    """(namespaces work, why not): probed once by running `true` inside them."""
    ok, why = _namespaces()
    if ok and sandbox_python() is None:
        return False, f"no Python interpreter that uid {NOBODY} can run ({sys.executable} is not)"
    return ok, why


@functools.lru_cache(maxsize=1)
def sandbox_python() -> str | None:
    """The interpreter `nobody` runs: this one when it can (a virtualenv under /root is out
    of its reach), else the system's python3 — so the code sees only the standard library."""
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            r = subprocess.run([python, "-I", "-c", "pass"], user=NOBODY, group=NOBODY,
                               extra_groups=[], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return python
    return None


def _namespaces() -> tuple[bool, str]:
    if sys.platform != "linux":
        return False, f"namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "not root: cannot create network/PID/mount namespaces or drop to nobody"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False, "the unshare or mount command is missing"
    try:
        r = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "true"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"unshare failed: {e}"
    return (True, "") if r.returncode == 0 else (False, f"unshare refused: {r.stderr.strip()[:200]}")


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a script in a fresh directory, under `limits`; the directory is removed."""
    limits = limits or SandboxLimits()
    isolated, why_not = isolation()
    with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-") as root:
        work, logs = Path(root, "work"), Path(root, "logs")
        work.mkdir(mode=0o700)
        logs.mkdir(mode=0o700)
        (work / "main.py").write_text(code)
        if isolated:
            os.chown(work, NOBODY, NOBODY)
            os.chown(work / "main.py", NOBODY, NOBODY)
            argv = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child",
                    "--mount-proc", sys.executable, "-I", "-c", _BOOTSTRAP, str(NOBODY), sandbox_python(),
                    str(logs / "status")]
        else:
            argv = [sys.executable, "-I", "main.py"]
        result = _run(argv, work, logs, limits)
    if not isolated:
        result.notes.append(f"network and filesystem NOT isolated ({why_not}); "
                            "only rlimits and a private directory applied")
    return result


def _run(argv: list[str], work: Path, logs: Path, limits: SandboxLimits) -> SandboxResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    with open(logs / "stdout", "wb+") as out, open(logs / "stderr", "wb+") as err:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True,
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
