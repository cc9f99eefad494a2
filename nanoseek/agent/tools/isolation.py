"""A function run in a child process that is killed at its deadline.

A thread cannot be stopped, and C code that holds the GIL (`10 ** (10 ** 8)`, a regex
backtracking, a big `math.factorial`) stops every other thread of the process until it
returns, so a timeout waited on in another thread never fires. A child process can be
killed whatever it is doing: `run_in_child` runs `fn(*args)` in one and sends back its
return value (pickled through a pipe), or raises `ChildTimeout` after killing the child's
whole process group, or `ChildDied` when it ended without a result.

On Linux the child is forked: nothing is pickled on the way in, closures work, and the
cost is the fork itself, which grows with the parent's mappings and resident memory (see
docs/agent.md for measurements); the child is reaped in the background once its result is read,
so its exit does not add to the call. The forked child runs only `fn` and leaves with `os._exit` (no atexit handlers,
no flushing of buffers it shares with the parent, garbage collection off), so a lock that
another thread of the parent held at the fork matters only if `fn` itself takes it, and
then the call times out instead of hanging. `fn` must not need threads or libraries that
are unsafe after fork (CUDA, an OpenMP pool the parent already used): pure Python and the
C functions it calls are fine. Elsewhere (macOS, Windows) the child is spawned through
`multiprocessing`: `fn` and its arguments must then pickle (a module-level function), and
each call pays an interpreter start.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

FORK_OK = sys.platform.startswith("linux") and hasattr(os, "fork")


class ChildTimeout(Exception):
    """The child did not return within its time and was killed."""


class ChildDied(Exception):
    """The child ended (a crash, a signal, `os._exit`) without sending a result."""


def run_in_child(fn: Callable, args: tuple, timeout_s: float, method: str | None = None):
    """fn(*args) in a child process, killed after timeout_s. An exception raised by fn is
    raised here again (its type and message; the traceback stays in the child)."""
    method = method or ("fork" if FORK_OK else "spawn")
    run = _run_forked if method == "fork" else _run_spawned
    ok, value = run(fn, args, timeout_s)
    if not ok:
        raise value
    return value


# ------------------------------------------------------------------------ fork
def _run_forked(fn, args, timeout_s):
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:     # no memory or no process slots for a copy of this process
        os.close(r)
        os.close(w)
        raise
    if pid == 0:                                        # the child: never returns
        os.close(r)
        _child(fn, args, w)
    os.close(w)
    _setpgid(pid)                                       # also done in the child: whichever runs first
    data = None
    try:
        data = _read_until(r, time.monotonic() + timeout_s)
    finally:
        os.close(r)
        _kill_group(pid)
        if data:        # a result: the child is exiting; its teardown need not delay the caller
            threading.Thread(target=_reap, args=(pid,), name="reap-tool-child", daemon=True).start()
        else:
            status = _reap(pid)
    if data is None:
        raise ChildTimeout(f"no result within {timeout_s:g} s")
    if not data:
        raise ChildDied(_describe(status))
    return pickle.loads(data)


def _child(fn, args, w: int) -> None:
    """Run fn, write (ok, value) to the pipe, leave at once whatever happened."""
    code = 0
    try:
        _setpgid(0)
        gc.disable()
        try:
            result = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - sent to the parent
            result = (False, _portable(e))
        try:
            payload = pickle.dumps(result)
        except Exception as e:  # noqa: BLE001 - an unpicklable return value
            payload = pickle.dumps((False, TypeError(f"the result cannot be sent back: {e}")))
        view = memoryview(payload)
        while view:
            view = view[os.write(w, view):]
        os.close(w)     # EOF now: the parent need not wait for this address space's teardown
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt, a broken pipe: just leave
        code = 1
    finally:
        os._exit(code)


def _portable(e: Exception) -> Exception:
    """e itself when it pickles (the parent re-raises its type), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _read_until(fd: int, deadline: float) -> bytes | None:
    """Everything written to fd until the writer closes it; None if the deadline comes first.
    Read as it arrives, so a result larger than the pipe's buffer cannot block the child."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _setpgid(pid: int) -> None:
    try:
        os.setpgid(pid, 0)
    except OSError:     # the child already moved itself, or has exited
        pass


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group (what it started too), or the child alone."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _reap(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:   # SIGCHLD ignored: the kernel reaped it
        return None


def _describe(status: int | None) -> str:
    if status is None:
        return "it ended without a result"
    if os.WIFSIGNALED(status):
        return f"it was killed by signal {os.WTERMSIG(status)} without a result"
    return f"it ended with exit status {os.waitstatus_to_exitcode(status)} without a result"


# ----------------------------------------------------------------------- spawn
def _run_spawned(fn, args, timeout_s):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_spawned_child, args=(send, fn, args), daemon=True)
    try:
        proc.start()            # raises here if fn or args do not pickle
    except BaseException:
        recv.close()
        send.close()
        raise
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise ChildTimeout(f"no result within {timeout_s:g} s")
        try:
            return recv.recv()
        except EOFError:
            proc.join(5)
            raise ChildDied(f"it ended with exit status {proc.exitcode} without a result") from None
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()


def _spawned_child(send, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except Exception as e:  # noqa: BLE001 - sent to the parent
        result = (False, _portable(e))
    send.send(result)
