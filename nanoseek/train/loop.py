"""The training loop every stage reuses (pretraining, SFT, DPO, GRPO and PPO).

A stage hands the `Trainer`:
  * `next_batch(step, micro)` -> a batch (anything its loss understands); deterministic in
    (step, micro) so the step number is the data position and resuming is exact;
  * `count_targets(batch)` -> a device tensor: the targets in the batch that count
    (default: labels, batch[1], that are not IGNORE_INDEX; see train/targets.py);
  * `loss_fn(model, batch, targets)` -> (this micro-batch's share of the step's loss,
    {name: its share of each logged value}). `targets` (a StepTargets) holds the step's
    counts summed over all its micro-batches: a loss divides its per-target sums by them,
    so the shares add up to the loss of one big batch whatever the masks (torchtitan's
    rule); the loop adds the shares and never averages micro-batch means;
  * optionally `evaluate(model)` -> {name: float} and `sample(model)` -> [str].
The loop owns the rest: AdamW with decoupled weight decay (none on norms, biases and
embeddings) or V4's Muon on the hidden matrices (train/numerics/optim.py; metrics.jsonl's
"optimizer" record says who updates what), warm-up + cosine / WSD, gradient
accumulation, clipping, bf16 autocast where the device has it (fp16 with a gradient
scaler as an option), the MoE's aux-loss-free bias update after every optimizer step
(loads counted over the whole step, all micro-batches, in training mode only), the
expert-load metrics and those of V3.2's indexer and V4's hash layers and
hyper-connections (train/numerics/arch_metrics.py), periodic evaluation and
samples, metrics as JSON lines (read from the device once per logging interval), a
progress bar, and atomic checkpoints that a `kill -9` cannot corrupt.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.dsa import indexer_parameters, set_indexer_mode
from nanoseek.parallel.single import SingleProcess
from nanoseek.quant.fp4_qat import routed_expert_linears, set_fp4_experts
from nanoseek.train.run import train_state
from nanoseek.train.numerics.arch_metrics import ArchMetrics, progress_fields
from nanoseek.train.numerics.bf16_weights import BF16Weights, compute_precision
from nanoseek.train.config import PRECISIONS, TrainConfig
from nanoseek.train.numerics.compile import compile_blocks, resolve_compile
from nanoseek.train.numerics.optim import build_optimizer, param_groups
from nanoseek.train.run.metrics import (METRICS_FILE, IntervalMeans, append, read_metrics,
                                        truncate_metrics)
from nanoseek.train.schedule import lr_at
from nanoseek.train.numerics.precision import choose_precision, hidden_size_of
from nanoseek.train.targets import StepTargets, count_targets, step_targets

__all__ = ["METRICS_FILE", "PRECISIONS", "StepTargets", "TrainConfig", "Trainer", "max_violation",
           "param_groups", "read_metrics", "resolve_precision", "truncate_metrics"]


def resolve_precision(precision: str, device: torch.device, hidden_size: int | None = None) -> str:
    """`auto` -> bf16 where the device multiplies bf16 fast (on a CPU, for a model at least
    CPU_BF16_MIN_HIDDEN wide), else fp32: the Trainer's choice (train/numerics/precision.py)."""
    return choose_precision(precision, device, hidden_size)[0]


def violations(loads: list[torch.Tensor]) -> torch.Tensor:
    """Expert-load imbalance per MoE layer, on the device: max load / mean load - 1
    (0 = perfectly balanced; 0 for a layer that saw no token)."""
    if not loads:
        return torch.zeros(0)
    out = []
    for load in loads:
        load = load.float()
        mean = load.mean()
        out.append(torch.where(mean > 0, load.max() / mean.clamp(min=1e-12) - 1, torch.zeros_like(mean)))
    return torch.stack(out)


def max_violation(load: torch.Tensor) -> float:
    """Expert-load imbalance of one layer as a number (see `violations`)."""
    return float(violations([load])[0])


def _moe_layers(model: nn.Module) -> list:
    return model.moe_layers() if hasattr(model, "moe_layers") else []


def _say(bar, message: str) -> None:
    """A line above the progress bar, on stderr with the bar (tqdm.write's default is
    stdout, which a pipe or --json output would receive)."""
    bar.write(message, file=sys.stderr)


def _add_shares(sums: dict, logs: dict) -> None:
    """A step's logged value is the sum of its micro-batches' shares (kept on the device)."""
    for k, v in logs.items():
        if v is None:
            sums.setdefault(k, None)
            continue
        v = v.detach() if torch.is_tensor(v) else v
        sums[k] = v if sums.get(k) is None else sums[k] + v


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path,
                 next_batch: Callable[[int, int], Any],
                 loss_fn: Callable[[nn.Module, Any, StepTargets], tuple[torch.Tensor, dict]],
                 count_targets: Callable[[Any], torch.Tensor] = count_targets,
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 sample: Callable[[nn.Module], list[str]] | None = None,
                 on_checkpoint: Callable[[nn.Module, int], None] | None = None,
                 tokens_in: Callable[[Any], int] | None = None,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 progress: bool = True, adapt_threads: bool = False, parallel=None,
                 update_router_biases: bool = True, trainable_state_only: bool = False,
                 stop_when: Callable[[dict], str | None] | None = None):
        """update_router_biases: the MoE's bias update after every step (off when the base
        is frozen, e.g. LoRA). trainable_state_only: train_state.pt keeps only the trainable
        parameters (LoRA's adapters; the frozen base is rebuilt from where it came from).
        stop_when(evaluation) -> a reason or None: early stopping on a measured target (e.g.
        held-out accuracy), checked after every evaluation; the run saves and ends there, and
        a resume of it trains no further step."""
        cfg.validate()
        if cfg.indexer_warmup_steps and not indexer_parameters(model):
            raise ValueError("training option 'indexer_warmup_steps': the model has no lightning "
                             "indexer (V3.2 and V4 have one); set it to 0")
        if cfg.fp4_experts_from is not None and not routed_expert_linears(model):
            raise ValueError("training option 'fp4_experts_from' (--fp4-experts-from): the model "
                             "has no routed experts to train in FP4; leave it unset")
        self.fp4_experts = False  # whether the routed experts are fake-quantised (_fp4_experts)
        # parallel: a nanoseek.parallel.runtime.Parallel when run on several processes; on
        # one, a SingleProcess, whose every answer is the process's own (parallel/single.py)
        self.parallel = parallel = parallel or SingleProcess()
        self.sharded = parallel.distributed  # sharded: DCP checkpoints
        loss_fn, count_targets = parallel.wrap_loss(loss_fn), parallel.wrap_count(count_targets)
        progress, adapt_threads = progress and parallel.is_main, adapt_threads and not parallel.distributed
        self.model, self.cfg, self.out_dir = model, cfg, Path(out_dir)
        self.next_batch, self.loss_fn, self.count_targets = next_batch, loss_fn, count_targets
        self.evaluate, self.sample, self.on_checkpoint = evaluate, sample, on_checkpoint
        self.stop_when, self.target_reached = stop_when, None  # target_reached: stop_when's reason
        self.tokens_in = tokens_in or (lambda b: int(b[0].numel()))
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.progress = progress
        self.update_router_biases, self.trainable_state_only = update_router_biases, trainable_state_only
        self.tuner = None
        if adapt_threads and next(model.parameters()).device.type == "cpu":
            from nanoseek.train.numerics.threads import ThreadTuner
            self.tuner = ThreadTuner(torch.get_num_threads())
        self.device = next(model.parameters()).device
        self.arch_metrics = ArchMetrics(model)  # empty for a V3 model: its records keep their fields
        self.precision, self.precision_reason = choose_precision(cfg.precision, self.device,
                                                                 hidden_size_of(model))
        self.compiled, self.compile_reason = resolve_compile(cfg.compile, self.device)
        if self.compiled:  # in place: same module code, same state-dict names (train/numerics/compile.py)
            compile_blocks(model)
        # bf16 on one process: bf16 weight copies, not autocast (train/numerics/bf16_weights.py says
        # why); several processes keep autocast (tensor parallelism holds DTensor weights,
        # and the copies were not measured there)
        self.bf16_copies = (BF16Weights(model) if self.precision == "bf16" and not parallel.distributed
                            else None)
        fused = self.device.type == "cuda"
        # AdamW, or Muon + AdamW as one optimizer; the report: who updates what (numerics/optim.py)
        self.optimizer, self.optimizer_report = build_optimizer(model, cfg, fused=fused or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.stopped_early = False
        self.stop_signal: int | None = None  # set by request_stop (train/run/signals.py)
        self.saved_step: int | None = None  # the step of the last save() in this process

    def clock(self) -> float:
        """Seconds for `elapsed` and the time limit: wall time, or (clock="cpu") this
        process's CPU time, which a busy neighbour on the machine does not inflate.
        Throughput (tok_s) and the thread tuner always read wall time."""
        return time.process_time() if self.cfg.clock == "cpu" else time.perf_counter()

    def request_stop(self, signum: int) -> None:
        """Stop at the next step boundary with a checkpoint (safe to call from a signal
        handler: it only sets a flag that `fit` reads between steps)."""
        self.stop_signal = signum

    # ------------------------------------------------------------------ pieces
    def precision_context(self):
        """The context forwards run in: bf16 weight copies, autocast, or plain fp32."""
        return compute_precision(self.precision, self.device, self.bf16_copies)

    def lr(self, step: int) -> float:
        """With a time limit the schedule runs on whichever comes first, steps or time:
        a run cut short by a slow (or shared) machine still ends with a decayed rate. The
        warm-up always counts steps: it is there for the optimizer's first updates (Adam's
        moments start empty), however long those take; a clock-driven warm-up was skipped
        by a time-limited run with a generous max_steps and destabilised it."""
        c = self.cfg
        if c.time_limit > 0 and step >= c.warmup_steps:
            step = max(step, int(self.elapsed / c.time_limit * c.max_steps))
        return lr_at(step, c.lr, c.max_steps, c.warmup_steps, c.schedule, c.min_lr_ratio, c.decay_frac)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches. Returns its metrics: device
        tensors (loss parts, grad_norm, max_violation per MoE layer), lr and step_tokens."""
        model = self.model
        model.train()
        warming = self._indexer_warm_up()
        self._fp4_experts()
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the whole step's batches first: their targets are every micro-batch's denominator
        batches = [self.next_batch(self.step, micro) for micro in range(self.cfg.grad_accum)]
        targets = step_targets(batches, self.count_targets)
        sums: dict[str, Any] = {}
        share = 1.0 / (len(batches) * self.parallel.dp)  # the arch metrics' mean over the step's micro-batches
        if self.parallel.pp > 1:  # 1F1B over the micro-batches
            sums = self.parallel.pipeline_step(batches, targets)
        else:
            for batch in batches:
                with self.precision_context():
                    loss, logs = self.loss_fn(model, batch, targets)
                self.scaler.scale(loss).backward()
                _add_shares(sums, {"loss": loss, **logs, **self.arch_metrics.forward_shares(share)})
        sums = self.parallel.after_backward(model, sums)  # gradients, logged values and loads summed over ranks
        if warming:  # only the indexers learn: every other gradient is dropped (AdamW skips them)
            indexer = {id(p) for p in indexer_parameters(model)}
            for p in model.parameters():
                if id(p) not in indexer:
                    p.grad = None
        grad_norm = self._optimizer_step()
        loads = [m.tokens_per_expert.clone() for m in _moe_layers(model)]
        sums.update(self.arch_metrics.step())  # the hash layers' loads, before the bias update clears them
        if warming:  # the routers stay as they are too; their counts start again
            for m in _moe_layers(model):
                m.tokens_per_expert.zero_()
        elif self.update_router_biases and hasattr(model, "update_router_biases"):
            model.update_router_biases()  # counts were summed over every micro-batch
        tokens = sum(self.tokens_in(b) for b in batches)
        tokens = self.parallel.global_count(tokens)  # every DP rank's (GRPO's completions differ in length)
        self.step += 1
        self.tokens_seen += tokens
        extra = self.parallel.step_metrics()
        return {**sums, "grad_norm": grad_norm, "max_violation": violations(loads), **extra,
                "lr": lr, "step_tokens": tokens}

    def _indexer_warm_up(self) -> bool:
        """V3.2's dense warm-up (§2.1.1): during the first `indexer_warmup_steps` steps the
        lightning indexers run dense and learn alone (KL toward the main attention), the rest
        of the model and its router biases held; after them, sparse training of everything.
        Set from the step number, so a resumed run is in the stage it left."""
        n = self.cfg.indexer_warmup_steps
        if n == 0:
            return False
        set_indexer_mode(self.model, "dense" if self.step < n else "sparse")
        return self.step < n

    def _fp4_experts(self) -> None:
        """V4's FP4 quantisation-aware training (quant/fp4_qat.py): from step
        `fp4_experts_from` on, the routed experts' weights are fake-quantised in every forward
        (evaluations and samples included). Set from the step number, so a resumed run is in
        the stage it left."""
        start = self.cfg.fp4_experts_from
        on = start is not None and self.step >= start
        if on != self.fp4_experts:
            set_fp4_experts(self.model, on)
            self.fp4_experts = on

    def _optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, step, zero; returns the gradient norm before clipping (a tensor)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self.parallel.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @torch.no_grad()
    def run_eval(self) -> dict:
        """Evaluation in eval mode: the MoE counts no load there, so the next bias update
        sees only training tokens (and evaluation draws no random numbers)."""
        model = self.model
        model.eval()
        out: dict[str, Any] = {}
        try:
            if self.evaluate is not None:
                with self.precision_context():
                    out.update(self.evaluate(model))
        finally:
            model.train()
        return out

    @torch.no_grad()
    def run_sample(self) -> list[str]:
        """Samples in eval mode (no load counted); the CPU RNG is restored afterwards so a
        run with samples trains exactly like one without."""
        if self.sample is None:
            return []
        model = self.model
        rng = torch.get_rng_state()
        model.eval()
        try:
            return self.sample(model)
        finally:
            model.train()
            torch.set_rng_state(rng)

    # ------------------------------------------------------------- checkpoints
    def loop_state(self) -> dict:
        """Everything but the model and optimizer tensors."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "scaler": self.scaler.state_dict(), "rng": train_state.rng_state(),
                "train_config": dataclasses.asdict(self.cfg), "stopped_early": self.stopped_early,
                "target_reached": self.target_reached}

    def load_loop_state(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.target_reached = state.get("target_reached")
        train_state.set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.saved_step = self.step

    def state_dict(self) -> dict:
        return {**self.loop_state(), "model": self.model_state(),
                "optimizer": self.optimizer.state_dict()}

    def model_state(self) -> dict:
        if self.trainable_state_only:
            return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        return self.model.state_dict()

    def save(self) -> None:
        """The HF checkpoint first (each file atomic), then train_state.pt: a resume always
        uses train_state.pt, so a kill between the two loses nothing. Sharded runs (several
        processes, or resumed from one) save with torch.distributed.checkpoint instead."""
        if self.sharded:
            from nanoseek.parallel import sharded_state as sharded
            sharded.save(self)
            self.saved_step = self.step
            return
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.model, self.step)
        train_state.save_state(self.out_dir, self.state_dict())
        self.saved_step = self.step

    def resume(self) -> bool:
        """Continue from train_state.pt if there is one (or from the sharded checkpoint of a
        multi-process run, on any number of processes); drop metrics logged after it."""
        from nanoseek.parallel import sharded_state as sharded
        if self.sharded or sharded.exists(self.out_dir):
            self.sharded = True
            if not sharded.resume(self):
                return False
            for m in _moe_layers(self.model):
                m.tokens_per_expert.zero_()
            if self._is_main():
                truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            return True
        state = train_state.load_state(self.out_dir)
        if state is None:
            return False
        self.model.load_state_dict(state["model"], strict=not self.trainable_state_only)
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_loop_state(state)
        for m in _moe_layers(self.model):
            m.tokens_per_expert.zero_()
        truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        return True

    # ----------------------------------------------------------------- metrics
    def _is_main(self) -> bool:
        return self.parallel.is_main

    def log(self, record: dict) -> None:
        if self._is_main():  # one writer of metrics.jsonl
            append(self.out_dir / METRICS_FILE, record)

    def mfu(self, tok_s: float) -> float | None:
        if self.flops_per_token and self.peak_flops:
            return self.flops_per_token * tok_s / self.peak_flops
        return None

    def _log_train(self, means: dict, lr: float, tokens: int, seconds: float, threads, bar) -> None:
        """One metrics line for the steps since the last: their means, the last step's lr."""
        tok_s = tokens / seconds if seconds > 0 else 0.0
        rec = {"kind": "train", "step": self.step, "tokens": self.tokens_seen,
               "elapsed": round(self.elapsed, 3), "tok_s": round(tok_s, 1), **means, "lr": lr}
        rec["max_violation"] = [round(v, 4) for v in rec.get("max_violation", [])]
        if "hash_max_load" in rec:
            rec["hash_max_load"] = [round(v, 4) for v in rec["hash_max_load"]]
        if self.tuner:
            rec["threads"] = threads
        mfu = self.mfu(tok_s)
        if mfu is not None:
            rec["mfu"] = mfu
        self.log(rec)
        if bar is not None:
            bar.set_postfix(ordered_dict={"loss": f"{rec['loss']:.3f}", "lr": f"{lr:.2e}",  # kwargs would be sorted
                                          "tok_s": f"{tok_s:,.0f}", **progress_fields(rec)})

    def _log_compile(self, seconds: float, bar) -> None:
        """The first compiled step holds the cold compile: say how long it took (it counts
        in `elapsed`, so inside any time limit, like every step)."""
        self.log({"kind": "compile", "step": self.step, "first_step_seconds": round(seconds, 3)})
        msg = f"torch.compile: first step (cold compile included) took {seconds:.1f}s"
        if bar is not None:
            _say(bar, msg)

    # --------------------------------------------------------------------- fit
    def fit(self, until: int | None = None) -> dict:
        """Train up to max_steps (or the time limit, or step `until`: a pause that leaves a
        checkpoint, the schedule still planned for max_steps); evaluate, sample and save on
        schedule and at the end. After `request_stop` it saves at the next step boundary
        and returns, the summary's "interrupted" naming the signal. Returns a summary."""
        stop = self._start_fit(until)
        bar = self._progress_bar()
        interval, seconds, tokens = IntervalMeans(), 0.0, 0  # since the last metrics line
        while self.step < stop and self.stop_signal is None and self.target_reached is None:
            threads = self.tuner.before_step(self.step) if self.tuner else None
            t0, wall0 = self.clock(), time.perf_counter()
            m = self.train_step()
            self.stop_signal = self.parallel.agree_stop(self.stop_signal)  # a signal on any rank stops all
            lr, step_tokens = m.pop("lr"), m.pop("step_tokens")
            interval.add(m)
            due = (self.step % self.cfg.log_every == 0 or self.step >= stop
                   or self.stop_signal is not None)  # a stop logs the steps it saves
            means = interval.read() if due else None  # the interval's one device sync
            wall = time.perf_counter() - wall0  # what the thread tuner, tok_s and compile report read
            dt = wall if self.cfg.clock == "wall" else self.clock() - t0
            dt = self.parallel.agree(dt)  # one clock for every rank: they stop together
            if self.tuner:
                self.tuner.after_step(wall)
            self.elapsed += dt
            if self.compiled and self.step == 1:
                self._log_compile(wall, bar)
            seconds, tokens = seconds + wall, tokens + step_tokens
            out_of_time = self.cfg.time_limit > 0 and self.elapsed >= self.cfg.time_limit
            if means is None and out_of_time:
                means = interval.read()
            if means is not None:
                self._log_train(means, lr, tokens, seconds, threads, bar)
                seconds, tokens = 0.0, 0
            if bar is not None:
                bar.update(1)
            self._on_schedule(stop, out_of_time, bar)
            if out_of_time:
                self.stopped_early = self.step < self.cfg.max_steps
                break
        interrupted = self.stop_signal is not None and self.step < stop and not self.stopped_early
        if interrupted and self.step > 0 and self.saved_step != self.step:
            self.save()
        if bar is not None:
            bar.close()
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "stopped_early": self.stopped_early, "target_reached": self.target_reached,
                "interrupted": self.stop_signal if interrupted else None,
                "tok_s": self.tokens_seen / self.elapsed if self.elapsed else 0.0}

    def _start_fit(self, until: int | None) -> int:
        """The step to stop at; drops metrics records past the state being continued (a run
        killed before its first checkpoint, or after its last, would otherwise log its
        re-run steps twice)."""
        cfg = self.cfg
        stop = min(cfg.max_steps, until) if until else cfg.max_steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self._is_main():
            truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            self._log_optimizer()
        if cfg.time_limit > 0 and self.elapsed >= cfg.time_limit and self.step < stop:
            # a resumed run whose time is already spent trains no extra step
            self.stopped_early = self.step < cfg.max_steps
            stop = self.step
        return stop

    def _log_optimizer(self) -> None:
        """Once per run, at step 0: which parameters each optimizer updates."""
        path = self.out_dir / METRICS_FILE
        if self.step == 0 and not any(r.get("kind") == "optimizer" for r in read_metrics(path)):
            self.log({"kind": "optimizer", "step": 0, **self.optimizer_report})

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step",
                    dynamic_ncols=True)

    def _on_schedule(self, stop: int, out_of_time: bool, bar) -> None:
        """After a step: evaluate, sample and save when due, and always at the end (the last
        step, the time limit) or at a pause (`until`)."""
        cfg, step = self.cfg, self.step
        last = step >= cfg.max_steps or out_of_time
        if self.evaluate is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            ev = self.run_eval()
            self.log({"kind": "eval", "step": step, "tokens": self.tokens_seen, **ev})
            if bar is not None and "val_loss" in ev:
                _say(bar, f"step {step}: val_loss {ev['val_loss']:.4f}"
                          + (f" val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
            if bar is not None and "accuracy" in ev:  # a task's held-out accuracy (SFT --eval-n, GRPO)
                _say(bar, f"step {step}: held-out accuracy {ev['accuracy']:.3f}")
            self.target_reached = self.stop_when(ev) if self.stop_when and not last else None
            if self.target_reached:
                last = True
                if bar is not None:
                    _say(bar, f"step {step}: stopping, {self.target_reached}")
        pause = step >= stop and not last
        if self.sample is not None and (last or (cfg.sample_every and step % cfg.sample_every == 0)):
            self.log({"kind": "sample", "step": step, "samples": self.run_sample()})
        if last or pause or (cfg.save_every and step % cfg.save_every == 0):
            self.stopped_early = (out_of_time or bool(self.target_reached)) and step < cfg.max_steps
            self.save()
