"""Run a function on N gloo processes of this machine, with timeouts everywhere, so a
distributed test fails with a message instead of hanging CI."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train_utils import micro_config

PG_TIMEOUT = 60  # seconds a collective may wait for a peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from nanoseek.parallel.launch import finish
    torch.set_num_threads(1)
    ok = False
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT))
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        ok = True
    except BaseException as e:  # the error travels to the test as text
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        finish(drain=ok)  # every rank done before any leaves (gloo aborts on in-flight sends)


def run_ranks(fn, world: int, out_dir, *args, timeout: float = 180, check: bool = True) -> list:
    """fn(rank, *args) on `world` processes; returns each rank's result (None for a rank that
    failed). Every process is killed once `timeout` seconds have passed; with `check`, a
    failed rank or the timeout raises with the ranks' errors."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if check and (hung or any(p.exitcode for p in procs)):
        raise RuntimeError(f"ranks {hung} still running after {timeout}s; exit codes "
                           f"{[p.exitcode for p in procs]}; errors: {errors(out_dir)}")
    paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
    return [torch.load(f, weights_only=False) if os.path.exists(f) else None for f in paths]


def errors(out_dir) -> dict[int, str]:
    return {int(f[4:-4]): open(os.path.join(out_dir, f)).read()
            for f in os.listdir(out_dir) if f.endswith(".err")}


# ------------------------------------------------------------- the training case
def global_batches(vocab: int, B: int = 4, S: int = 16):
    """A learnable stream of global batches (odd = even + 1), fixed by (step, micro)."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(3, vocab, (64, S + 1), generator=g)
    pool[:, 1::2] = (pool[:, 0::2][:, :pool[:, 1::2].shape[1]] + 1) % vocab

    def next_batch(step, micro):
        idx = torch.randint(0, 64, (B,), generator=torch.Generator().manual_seed(step * 31 + micro))
        rows = pool[idx]
        return rows[:, :-1], rows[:, 1:]
    return next_batch


def loss_fn(model, batch, targets):
    out = model.loss(*batch, num_targets=targets.count, num_batches=targets.micro_batches)
    return out.loss, {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}


def full_grads(model) -> dict:
    """name -> full gradient of what this rank holds (DTensors gathered)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[n] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def make_trainer(parallel_kw: dict | None, steps: int = 3, B: int = 4, out_dir=None,
                 on_checkpoint=None, grad_accum: int = 1):
    """The micro model's Trainer on global micro-batches of B rows (each DP rank takes its
    slice); parallel_kw None: one process."""
    from nanoseek.model import CausalLM
    from nanoseek.train.loop import TrainConfig, Trainer

    torch.manual_seed(0)
    model = CausalLM(micro_config())
    par = None
    if parallel_kw is not None:
        from nanoseek.parallel import ParallelConfig
        from nanoseek.parallel.runtime import Parallel
        par = Parallel(model, ParallelConfig(**parallel_kw), torch.device("cpu"))
    data = global_batches(model.config.vocab_size, B * grad_accum)

    def next_batch(step, micro):  # the step's rows split into grad_accum micro-batches
        x, y = data(step, 0)
        rows = (x[micro * B:(micro + 1) * B], y[micro * B:(micro + 1) * B])
        return par.local_rows(rows) if par else rows
    tc = TrainConfig(max_steps=steps, batch_size=B, grad_accum=grad_accum, lr=1e-2, warmup_steps=0, eval_every=0,
                     save_every=0, grad_clip=1.0)
    return Trainer(model, tc, out_dir or "unused", next_batch, loss_fn,
                   count_targets=lambda b: model.loss_targets(b[1]), progress=False,
                   parallel=par, on_checkpoint=on_checkpoint)


def train_steps(tr, steps: int) -> list[dict]:
    return [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in tr.train_step().items()}
            for _ in range(steps)]


def train_case(rank, parallel_kw: dict | None, steps: int = 3, B: int = 4, grad_accum: int = 1):
    """`steps` optimizer steps; returns the logged metrics, the first step's gradients
    (whole tensors) and the final router biases."""
    tr = make_trainer(parallel_kw, steps, B=B, grad_accum=grad_accum)
    seen = {}
    orig = tr.optimizer.step

    def spy(*a, **k):
        if not seen:
            seen.update(full_grads(tr.model))
        return orig(*a, **k)
    tr.optimizer.step = spy
    metrics = train_steps(tr, steps)
    biases = [m.gate.e_score_correction_bias.clone() for m in tr.model.moe_layers()]
    return {"metrics": metrics, "grads": seen, "biases": biases}
