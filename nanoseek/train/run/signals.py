"""Ctrl-C and SIGTERM stop training at the next step boundary, with a checkpoint.

Without this a SIGINT raised KeyboardInterrupt wherever the step was and lost every step
since the last periodic save (up to save_every - 1), silently. Now the first SIGINT or
SIGTERM only asks the `Trainer` to stop (`request_stop`): the step in progress finishes,
the loop saves, and the caller raises `Interrupted`, which the CLI turns into one line
(where the checkpoint is, how to resume) and the conventional exit code 128 + signal
(130 for SIGINT, 143 for SIGTERM). A second signal aborts at once (`Aborted`): the last
saved checkpoint is intact, since every file is written atomically.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(Exception):
    """Training stopped on a signal after saving its state at `step`."""

    def __init__(self, signum: int, step: int, out_dir):
        self.signum, self.step, self.out_dir = signum, step, out_dir
        self.exit_code = 128 + signum
        where = (f"checkpoint saved at step {step} in {out_dir}" if step
                 else f"stopped before the first step; nothing to save in {out_dir}")
        super().__init__(f"interrupted by {signal_name(signum)}: {where}")


class Aborted(KeyboardInterrupt):
    """A second signal while stopping: abort without waiting for the step to end."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"aborted by a second {signal_name(signum)}")


@contextlib.contextmanager
def stop_on_signals(trainer, signals=STOP_SIGNALS):
    """While the block runs, the first of `signals` calls trainer.request_stop(signum) and
    the next raises Aborted. Handlers are restored afterwards. Signals reach only the main
    thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def abort(signum, frame):
        raise Aborted(signum)

    def stop(signum, frame):
        trainer.request_stop(signum)
        for s in signals:
            signal.signal(s, abort)

    for s in signals:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
