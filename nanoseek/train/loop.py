"""The training loop every stage reuses (pretraining now; SFT, DPO and GRPO plug in).

A stage hands the `Trainer` three things:
  * `next_batch(step, micro)` -> a batch (anything its loss understands); deterministic in
    (step, micro) so the step number is the data position and resuming is exact;
  * `loss_fn(model, batch)` -> (loss to backpropagate, {name: float or tensor} to log);
  * optionally `evaluate(model)` -> {name: float} and `sample(model)` -> [str].
The loop owns the rest: AdamW with decoupled weight decay (none on norms, biases and
embeddings), warm-up + cosine / WSD, gradient accumulation, clipping, bf16 autocast where
the device has it (fp16 with a gradient scaler as an option), the MoE's aux-loss-free
bias update after every optimizer step (loads counted over the whole step, all
micro-batches), the expert-load metrics, periodic evaluation and samples, metrics as JSON
lines, a progress bar, and atomic checkpoints that a `kill -9` cannot corrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.train import checkpointing
from nanoseek.train.schedule import SCHEDULES, lr_at

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto: bf16 autocast on CUDA with bf16, fp32 elsewhere
    eval_every: int = 100  # 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (0 = all)
    save_every: int = 100  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end
    log_every: int = 1
    seed: int = 1337
    time_limit: float = 0.0  # seconds of training, then stop (0 = none); the schedule
    # then follows max(step / max_steps, elapsed / time_limit), so it is not bit-reproducible

    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"training option '{name}': {msg}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, "precision",
             f"must be one of {PRECISIONS}, got {self.precision!r}")
        need(0 <= self.warmup_steps, "warmup_steps", "must be >= 0")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices of linear layers; not norms, biases, embeddings or the router
    (`*.gate.weight`, the MoE's expert-affinity matrix)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        router = name == "gate.weight" or name.endswith(".gate.weight")
        (decay if p.ndim >= 2 and id(p) not in embeddings and not router else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def max_violation(load: torch.Tensor) -> float:
    """Expert-load imbalance: max load / mean load - 1 (0 = perfectly balanced)."""
    mean = float(load.float().mean())
    return float(load.max()) / mean - 1 if mean > 0 else 0.0


def _moe_layers(model: nn.Module) -> list:
    return model.moe_layers() if hasattr(model, "moe_layers") else []


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path,
                 next_batch: Callable[[int, int], Any],
                 loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 sample: Callable[[nn.Module], list[str]] | None = None,
                 on_checkpoint: Callable[[nn.Module, int], None] | None = None,
                 tokens_in: Callable[[Any], int] | None = None,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 progress: bool = True, adapt_threads: bool = False):
        cfg.validate()
        self.model, self.cfg, self.out_dir = model, cfg, Path(out_dir)
        self.next_batch, self.loss_fn = next_batch, loss_fn
        self.evaluate, self.sample, self.on_checkpoint = evaluate, sample, on_checkpoint
        self.tokens_in = tokens_in or (lambda b: int(b[0].numel()))
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.progress = progress
        self.tuner = None
        if adapt_threads and next(model.parameters()).device.type == "cpu":
            from nanoseek.train.threads import ThreadTuner
            self.tuner = ThreadTuner(torch.get_num_threads())
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.stopped_early = False

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def lr(self, step: int) -> float:
        """With a time limit the schedule runs on whichever comes first, steps or time:
        a run cut short by a slow (or shared) machine still ends with a decayed rate."""
        c = self.cfg
        if c.time_limit > 0:
            step = max(step, int(self.elapsed / c.time_limit * c.max_steps))
        return lr_at(step, c.lr, c.max_steps, c.warmup_steps, c.schedule, c.min_lr_ratio, c.decay_frac)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        model, cfg = self.model, self.cfg
        model.train()
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self.next_batch(self.step, micro)
            with self.autocast():
                loss, logs = self.loss_fn(model, batch)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            tokens += self.tokens_in(batch)
            for k, v in {"loss": loss, **logs}.items():
                if v is not None:
                    v = v.detach() if torch.is_tensor(v) else v
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loads = [m.tokens_per_expert.clone() for m in _moe_layers(model)]
        if hasattr(model, "update_router_biases"):
            model.update_router_biases()  # counts were summed over every micro-batch
        self.step += 1
        self.tokens_seen += tokens
        return {**sums, "lr": lr, "grad_norm": float(grad_norm), "step_tokens": tokens,
                "max_violation": [round(max_violation(l), 4) for l in loads]}

    @torch.no_grad()
    def run_eval(self) -> dict:
        """Evaluation leaves the MoE load counters as it found them (it draws no random
        numbers; `run_sample` is the one that restores the CPU RNG)."""
        model = self.model
        saved = [m.tokens_per_expert.clone() for m in _moe_layers(model)]
        model.eval()
        out: dict[str, Any] = {}
        try:
            if self.evaluate is not None:
                with self.autocast():
                    out.update(self.evaluate(model))
        finally:
            model.train()
            for m, s in zip(_moe_layers(model), saved):
                m.tokens_per_expert.copy_(s)
        return out

    @torch.no_grad()
    def run_sample(self) -> list[str]:
        if self.sample is None:
            return []
        model = self.model
        saved = [m.tokens_per_expert.clone() for m in _moe_layers(model)]
        rng = torch.get_rng_state()
        model.eval()
        try:
            return self.sample(model)
        finally:
            model.train()
            torch.set_rng_state(rng)
            for m, s in zip(_moe_layers(model), saved):
                m.tokens_per_expert.copy_(s)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": checkpointing.rng_state(),
                "train_config": dataclasses.asdict(self.cfg), "stopped_early": self.stopped_early}

    def save(self) -> None:
        """The HF checkpoint first (each file atomic), then train_state.pt: a resume always
        uses train_state.pt, so a kill between the two loses nothing."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.model, self.step)
        checkpointing.save_state(self.out_dir, self.state_dict())

    def resume(self) -> bool:
        """Continue from train_state.pt if there is one; drop metrics logged after it."""
        state = checkpointing.load_state(self.out_dir)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpointing.set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        for m in _moe_layers(self.model):
            m.tokens_per_expert.zero_()
        truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        return True

    # ----------------------------------------------------------------- metrics
    def log(self, record: dict) -> None:
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def mfu(self, tok_s: float) -> float | None:
        if self.flops_per_token and self.peak_flops:
            return self.flops_per_token * tok_s / self.peak_flops
        return None

    # --------------------------------------------------------------------- fit
    def fit(self, until: int | None = None) -> dict:
        """Train up to max_steps (or the time limit, or step `until`: a pause that leaves a
        checkpoint, the schedule still planned for max_steps); evaluate, sample and save on
        schedule and at the end. Returns a summary of the run."""
        cfg = self.cfg
        stop = min(cfg.max_steps, until) if until else cfg.max_steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True)
        # records past the state being continued (a run killed before its first checkpoint,
        # or after its last) would otherwise be followed by their re-run: duplicate steps
        truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        tok_s = 0.0
        if cfg.time_limit > 0 and self.elapsed >= cfg.time_limit and self.step < stop:
            # a resumed run whose time is already spent trains no extra step
            self.stopped_early = self.step < cfg.max_steps
            stop = self.step
        while self.step < stop:
            threads = self.tuner.before_step(self.step) if self.tuner else None
            t0 = time.perf_counter()
            m = self.train_step()
            dt = time.perf_counter() - t0
            if self.tuner:
                self.tuner.after_step(dt)
                m["threads"] = threads
            self.elapsed += dt
            tok_s = m["step_tokens"] / dt
            step = self.step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rec = {"kind": "train", "step": step, "tokens": self.tokens_seen,
                       "elapsed": round(self.elapsed, 3), "tok_s": round(tok_s, 1), **m}
                mfu = self.mfu(tok_s)
                if mfu is not None:
                    rec["mfu"] = mfu
                rec.pop("step_tokens")
                self.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
            out_of_time = cfg.time_limit > 0 and self.elapsed >= cfg.time_limit
            last = step >= cfg.max_steps or out_of_time
            pause = step >= stop and not last
            if self.evaluate is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                ev = self.run_eval()
                self.log({"kind": "eval", "step": step, "tokens": self.tokens_seen, **ev})
                if bar is not None and "val_loss" in ev:
                    bar.write(f"step {step}: val_loss {ev['val_loss']:.4f}"
                              + (f" val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
            if self.sample is not None and (last or (cfg.sample_every and step % cfg.sample_every == 0)):
                self.log({"kind": "sample", "step": step, "samples": self.run_sample()})
            if last or pause or (cfg.save_every and step % cfg.save_every == 0):
                self.stopped_early = out_of_time and step < cfg.max_steps
                self.save()
            if out_of_time:
                self.stopped_early = step < cfg.max_steps
                break
        if bar is not None:
            bar.close()
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "stopped_early": self.stopped_early,
                "tok_s": self.tokens_seen / self.elapsed if self.elapsed else 0.0}


def read_metrics(path: str | Path) -> list[dict]:
    """Metric records; a torn last line (the process was killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step` (the resumed checkpoint); rewritten atomically."""
    from nanoseek.checkpoint import atomic_write_text

    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
