"""The speedrun: the whole pipeline on the embedded corpus with the `tiny` preset, on a
CPU, in minutes: tokenizer -> pretraining -> evaluation of the saved checkpoint -> report.

Training runs for `max_steps` or `minutes`, whichever ends first (the learning-rate
schedule follows whichever is further along, so a slow or shared machine still gets a
fully decayed run). `make speedrun` follows it with the RL stages (speedrun_rl.py: SFT,
GRPO, held-out evaluation) from its checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from nanoseek.config import preset
from nanoseek.train.loop import TrainConfig

# The speedrun's training recipe, sized on a 2-core CPU (docs/training.md). Weight
# decay 0.3: the run makes ~6 passes over its 104k training tokens, and stronger decay
# generalises better (validation 1.5452 and 1.5520 bits per byte against 1.5551 with 0.1,
# idle 2-core CPU, adaptive threads, same steps; 0.5: 1.5475; lr 2e-3: 1.5518; both: 1.5571).
SPEEDRUN_TRAIN = dict(batch_size=8, seq_len=256, grad_accum=1, lr=3e-3, warmup_steps=30,
                      schedule="cosine", min_lr_ratio=0.1, weight_decay=0.3, grad_clip=1.0,
                      eval_every=50, eval_tokens=0, save_every=100, sample_every=0, seed=1337)


# Steps by the precision the run trains in: bf16 buys tokens, and the speedrun spends them
# on more steps in the same wall time. Measured on the 2-core AMD EPYC with avx512_bf16:
# a bf16 step (weight copies, train/numerics/bf16_weights.py) ran 1.28-1.32x an fp32 one, so 380
# bf16 steps take about the time of 300 fp32 ones (fresh clones: 163 s for 300 bf16 steps,
# against 204 s for 300 fp32). Validation bits per byte, one thread: 300 bf16 steps 1.5448,
# 380 1.5165 (seed 1337, the speedrun's); with seed 1, whose split holds other validation
# documents, 1.3152 and 1.2290.
SPEEDRUN_STEPS = {"bf16": 380}
SPEEDRUN_DEFAULT_STEPS = 300  # fp32, fp16


def default_steps(precision: str, hidden_size: int) -> tuple[int, str]:
    """(max_steps, precision) for a new speedrun: the precision `auto` (or the one asked
    for) resolves to for a model this wide on this device (the Trainer's own choice), and
    the steps it buys."""
    from nanoseek.train.numerics.precision import choose_precision
    from nanoseek.train.pretrain import default_device
    chosen, _ = choose_precision(precision, default_device(), hidden_size)
    return SPEEDRUN_STEPS.get(chosen, SPEEDRUN_DEFAULT_STEPS), chosen


# γ of the aux-loss-free update. V3 uses 0.001 over ~10^5 steps; in a few hundred steps that
# moves a bias by at most a few tenths and the busiest expert of a layer ends up with most
# tokens (measured: max violation 5-7 of a possible 7 at step 179 with 0.001).
SPEEDRUN_BIAS_SPEED = 0.01


def check_speedrun_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """runs/NAME may hold only a speedrun of ours, and is reused only when asked: --resume
    continues it, --overwrite replaces it (deleting only its own files: run_dir.py). A
    directory that is not a speedrun (another run, anything else) is never touched."""
    from nanoseek.train.run.run_dir import (RunError, entries, listing, progress_of, run_kind,
                                            trained_steps)

    kind = run_kind(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; choose another --name")
    if kind is None and entries(out):
        raise RunError(f"{out} exists and is not a nanoseek run (it holds {listing(entries(out))}); "
                       "choose another --name")
    if kind is not None and kind != "speedrun":
        raise RunError(f"{out} holds a nanoseek {kind} run, not a speedrun; choose another --name")
    if kind == "speedrun" and not (resume or overwrite) and trained_steps(out):
        raise RunError(f"{out} holds a speedrun ({progress_of(out)}); pass --resume to continue "
                       "it, --overwrite to replace it (deletes only its own files), or choose "
                       "another --name")


def speedrun(name: str = "speedrun", root: str | Path = "runs", minutes: float | None = None,
             max_steps: int | None = None, progress: bool = True, log=print,
             threads: int | None = None, resume: bool = False, overwrite: bool = False,
             **train_overrides) -> Path:
    """Run every stage; returns the path of report.md. minutes / max_steps / threads: None
    = 7 / 300 (380 in bf16: SPEEDRUN_STEPS) / 0 (adaptive) for a new speedrun, the run's
    own on resume."""
    from nanoseek.train.run.run_lock import check_unlocked, run_lock

    t_start = time.perf_counter()
    out = Path(root) / name
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"speedrun option 'minutes': must be a finite number > 0, got {minutes!r}")
    check_unlocked(out)
    check_speedrun_dir(out, resume, overwrite)
    with run_lock(out):  # held through pretraining, evaluation and the report
        check_speedrun_dir(out, resume, overwrite)
        return _speedrun(out, minutes, max_steps, progress, log, threads, resume, overwrite,
                         train_overrides, t_start)


def _speedrun(out: Path, minutes, max_steps, progress, log, threads, resume, overwrite,
              train_overrides, t_start) -> Path:
    from nanoseek.reports.run_report import write_report
    from nanoseek.train.eval import evaluate_checkpoint
    from nanoseek.train.pretrain import PretrainConfig, pretrain, write_run

    cfg = preset("tiny", bias_update_speed=SPEEDRUN_BIAS_SPEED)
    if threads is None and not resume:
        threads = 0
    given = {"train.max_steps": max_steps, "train.time_limit": None if minutes is None else minutes * 60}
    steps, precision = default_steps(train_overrides.get("precision", "auto"), cfg.hidden_size)
    minutes, max_steps = 7.0 if minutes is None else minutes, steps if max_steps is None else max_steps
    tcfg = TrainConfig(**{**SPEEDRUN_TRAIN, "max_steps": max_steps, "time_limit": minutes * 60,
                          **train_overrides})
    log(f"[1/3] tokenizer + pretraining: tiny preset, {precision}, up to {max_steps} steps or {minutes:g} min"
        + (" (resuming: the run's own settings unless given)" if resume else ""))
    run = pretrain(out, PretrainConfig(model=cfg, train=tcfg), resume=resume, overwrite=overwrite,
                   overrides={k: v for k, v in given.items() if v is not None}, progress=progress,
                   log=log, threads=threads, kind="speedrun")
    log("[2/3] evaluation: reloading the checkpoint from disk")
    ev = evaluate_checkpoint(out, run["settings"]["train"]["seq_len"])
    log(f"      validation loss {ev['val_loss']:.4f} nats/token, {ev['val_bpb']:.4f} bits/byte "
        f"(unigram baseline {run['unigram_loss']:.4f} / {run['unigram_bpb']:.4f})")
    log("[3/3] report")
    total = time.perf_counter() - t_start
    run["report_extra"] = {
        "reloaded checkpoint: validation loss / bits per byte (all validation tokens)":
            f"{ev['val_loss']:.4f} / {ev['val_bpb']:.4f}",
        "speedrun wall time, all stages (s)": f"{total:.0f}",
    }
    write_run(out, run)  # so that `nanoseek report` re-makes the same card later
    path = write_report(out, title="nanoseek speedrun")
    log(f"report: {path}  ({total / 60:.1f} min in all)")
    return path
