"""Starting a multi-process run, and the pieces of a run that only one rank may do.

`nanoseek pretrain --nproc N` (and `sft`, `grpo`) re-runs the same command under torchrun
(one machine, `--standalone` rendezvous); `torchrun ... -m nanoseek.train.pretrain ARGS`
(`-m nanoseek.train.posttrain.sft`, `-m nanoseek.train.rl.grpo`, or `torchrun ... -m nanoseek
COMMAND ARGS`) is the same thing started by hand, which is how a multi-node run starts (see
docs/distributed.md: --nnodes, --node-rank, --rdzv-endpoint). Under torchrun, a stage joins the
process group, lays the model out on the mesh, lets rank 0 alone prepare the data and write
run.json, the metrics and the checkpoints' consolidated HF copy.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch.distributed as dist


def under_torchrun() -> bool:
    """True in a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0 (or a single process); also after the process group is gone."""
    if not under_torchrun():  # a stray RANK in the environment does not make one process a follower
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def threads_per_process() -> int:
    """This machine's cores shared among the processes torchrun started on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes files: tokenizer, token arrays); the others
    run it after, and then only read what rank 0 wrote."""
    if not is_main():
        dist.barrier()
    yield
    if is_main() and dist.is_initialized():
        dist.barrier()


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hung."""


@contextlib.contextmanager
def clear_peer_errors():
    """Turn a failed collective into one line that says what happened, and leave the
    process group so that this process exits instead of waiting on its peers."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        collective = isinstance(e, dist.DistError) or any(
            w in str(e) for w in ("gloo", "NCCL", "Connection", "timed out", "Timed out"))
        if not dist.is_initialized() or isinstance(e, PeerFailure) or not collective:
            raise
        rank = dist.get_rank()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerFailure(f"rank {rank}: a collective failed or timed out ({first}); another "
                          "rank probably died: see its log above") from e


def finish(drain: bool = True) -> None:
    """Leave the process group. drain: wait for every rank first (a barrier), so that no
    rank tears its group down while a peer's last point-to-point message to it is still in
    flight; gloo then aborts the process ("terminate called without an active exception",
    seen once in the four-process pipeline test under load). Not after a failure, where a
    peer may never arrive."""
    if dist.is_available() and dist.is_initialized():
        try:
            if drain:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def session(timeout: float = 300.0):
    """A post-training stage's time under torchrun: join the process group (unless this
    process already has), turn a failed collective into a `PeerFailure`, and leave the
    group at the end if this call joined it (a caller that joined keeps its group: the
    tests run several stages in one process group). Yields this rank's device
    (cuda:LOCAL_RANK, or cpu), or None for a single process."""
    if not under_torchrun():
        yield None
        return
    from nanoseek.parallel.mesh import init_distributed
    joined = not dist.is_initialized()
    device = init_distributed(timeout)
    ok = False
    try:
        with clear_peer_errors():
            yield device
        ok = True
    finally:
        if joined:
            finish(drain=ok)


def torchrun(nproc: int, args: list[str], command: str = "pretrain") -> int:
    """Run `nanoseek COMMAND ARGS` on nproc local processes; returns the exit code of
    torchrun (non-zero when any rank failed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "nanoseek", command, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads_per_process() // nproc))}
    return subprocess.call(cmd, env=env)


def relaunch(nproc: int, command: str) -> int:
    """`nanoseek COMMAND --nproc N ...` started by hand: the same command under torchrun."""
    return torchrun(nproc, args_without_nproc(sys.argv, command), command)


def args_without_nproc(argv: list[str], command: str = "pretrain") -> list[str]:
    """The options of this command line after COMMAND, minus --nproc (and its value)."""
    args = argv[argv.index(command) + 1:] if command in argv else argv[1:]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
