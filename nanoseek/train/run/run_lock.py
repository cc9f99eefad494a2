"""One process per run directory: an flock on `DIR/.nanoseek.lock`.

Two trainings writing one directory would interleave metrics.jsonl and overwrite each
other's checkpoints, and both would report success. The lock is `fcntl.flock` on a file in
the run directory, held for as long as the run is open; the kernel drops it when the
process ends, however it ends (even `kill -9`), so a lock is never stale. The file holds
the holder's PID for the message the next process prints. The file itself stays: deleting
it while another process waits on it would let two processes hold "the" lock at once.
On a system without fcntl (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nanoseek.train.run.run_dir import LOCK_FILE, RunError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: set[str] = set()  # resolved directories whose lock this process holds


def _busy(out: Path, pid: str) -> RunError:
    who = f"PID {pid}" if pid else "a process whose PID is not recorded yet"
    return RunError(f"{out} is in use by another nanoseek process ({who}); wait for it to "
                    "finish or stop it (its lock is released when it exits)")


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip()


def check_unlocked(out: Path) -> None:
    """Raise RunError naming the holder if another process holds `out`'s lock. Only reads
    (a shared, non-blocking probe of the lock file), so a refused command changes nothing."""
    path = Path(out) / LOCK_FILE
    if fcntl is None or not path.exists() or str(Path(out).resolve()) in _held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(Path(out), _read_pid(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(out: str | Path):
    """Hold `out`'s lock (creating `out`) for the block; re-entrant within one process
    (the speedrun holds it around pretraining, evaluation and the report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if fcntl is None or key in _held:  # held by an outer block of this process
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise _busy(out, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
