"""Scaling on this machine: training tokens/s of 1 process against 2 processes, as data
parallel (FSDP2, ep=1) and as expert parallel (ep=2: each process keeps half the routed
experts and token-slots travel with all-to-all), gloo on CPU (NCCL where CUDA is).

The same model, the same global batch and the same steps in every layout. Each process gets
cores / processes threads, so the baseline and the 2-process runs use the same machine;
efficiency = tok_s_2 / (2 x tok_s_1 at one thread per process) is the usual per-process
scaling efficiency, and tok_s_1_all_cores is the single process given every core.
a2a_share = the all-to-all seconds (forward and backward, slowest rank) over the step time
of the EP run. Step times are medians after warm-up. On a shared machine other processes
load the cores: run it on a quiet one for figures to quote.

    python benchmarks/bench_parallel.py [--preset tiny] [--batch 8] [--seq 128] [--steps 8] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import emit, json_only_stdout, log  # noqa: E402


def trainer(cfg, batch: int, seq: int, steps: int, parallel):
    from nanoseek.model import CausalLM
    from nanoseek.train.loop import TrainConfig, Trainer

    torch.manual_seed(0)
    model = CausalLM(cfg)
    par = None
    if parallel is not None:
        from nanoseek.parallel.runtime import Parallel
        par = Parallel(model, parallel, torch.device("cpu"))

    def next_batch(step, micro):
        g = torch.Generator().manual_seed(step * 7 + micro)
        ids = torch.randint(3, cfg.vocab_size, (batch, seq + 1), generator=g)
        rows = (ids[:, :-1], ids[:, 1:])
        return par.local_rows(rows) if par else rows

    def loss_fn(m, b, targets):
        out = m.loss(*b, num_targets=targets.count, num_batches=targets.micro_batches)
        return out.loss, {}
    tc = TrainConfig(max_steps=steps, batch_size=batch, seq_len=seq, warmup_steps=0,
                     eval_every=0, save_every=0)
    return Trainer(model, tc, tempfile.mkdtemp(), next_batch, loss_fn,
                   count_targets=lambda b: model.loss_targets(b[1]), progress=False, parallel=par)


def measure(tr, steps: int, warmup: int = 2) -> dict:
    """Median step seconds and all-to-all seconds per step (after warm-up)."""
    times, a2a = [], []
    for i in range(warmup + steps):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        m = tr.train_step()
        dt = time.perf_counter() - t
        if tr.parallel is not None:
            dt = tr.parallel.agree(dt)
        if i >= warmup:
            times.append(dt)
            a2a.append(float(m.get("a2a_s", 0.0)))
    return {"step_s": statistics.median(times), "a2a_s": statistics.median(a2a)}


def _rank(rank, world, port, args, ep, out):
    from nanoseek.config import preset
    from nanoseek.parallel import ParallelConfig

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.cores // world))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        tr = trainer(preset(args.preset), args.batch, args.seq, args.steps, ParallelConfig(ep=ep))
        res = measure(tr, args.steps)
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def two_processes(args, ep: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "r.pt")
    mp.start_processes(_rank, args=(2, port, args, ep, out), nprocs=2, start_method="spawn")
    return torch.load(out)


def one_process(args, threads: int) -> dict:
    from nanoseek.config import preset
    torch.set_num_threads(threads)
    return measure(trainer(preset(args.preset), args.batch, args.seq, args.steps, None), args.steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = json_only_stdout(args.json)
    args.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tokens = args.batch * args.seq
    one = one_process(args, 1)
    log(f"1 process, 1 thread: {one['step_s']:.3f} s/step")
    one_all = one_process(args, args.cores)
    log(f"1 process, {args.cores} threads: {one_all['step_s']:.3f} s/step")
    dp = two_processes(args, ep=1)
    log(f"2 processes, dp=2: {dp['step_s']:.3f} s/step")
    ep = two_processes(args, ep=2)
    log(f"2 processes, dp=2 ep=2: {ep['step_s']:.3f} s/step, all-to-all {ep['a2a_s']:.4f} s")
    tok_s_1, tok_s_2, tok_s_dp = tokens / one["step_s"], tokens / ep["step_s"], tokens / dp["step_s"]
    emit({"efficiency": tok_s_2 / (2 * tok_s_1), "tok_s_1": tok_s_1, "tok_s_2": tok_s_2,
          "a2a_share": ep["a2a_s"] / ep["step_s"], "efficiency_dp": tok_s_dp / (2 * tok_s_1),
          "tok_s_2_dp": tok_s_dp, "tok_s_1_all_cores": tokens / one_all["step_s"],
          "cores": args.cores, "preset": args.preset, "batch": args.batch, "seq": args.seq},
         args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
