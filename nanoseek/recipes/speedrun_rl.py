"""The RL speedrun: SFT on arithmetic demonstrations -> GRPO -> held-out evaluation ->
report, from the pretraining speedrun's checkpoint, on a CPU, in minutes (`nanoseek
speedrun-rl`; `make speedrun` runs it after `nanoseek speedrun`).

SFT stops on an accuracy threshold, not a time: its accuracy curve is a plateau then a jump
(shared/notes/grpo-on-cpu.md), and GRPO needs a starting point in roughly the 30-50 % band
(from ~10 % almost every group has equal rewards: no signal). Held-out accuracy before and
after GRPO is measured on the same problems, greedy, through the same engine, so the gain
is GRPO's alone. Continuing SFT would likely gain as much, faster: labels exist here; the
point is to show GRPO's effect, and the report says so.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

RL_TASK = dict(digits=2, ops="+")  # ~4,000 distinct problems, ~400 of them held out
OWN = ("run.json", "pretrain", "sft", "grpo", "report.md", "result.json", "reward.png",
       "train_accuracy.png", "heldout_accuracy.png")  # what --overwrite may delete
MARKER = {"nanoseek": "speedrun-rl"}


def prepare_dir(out: Path, overwrite: bool) -> None:
    """runs/NAME is created, or replaced when it holds an RL speedrun and --overwrite is
    given (only its own entries are deleted); anything else there is refused, untouched."""
    from nanoseek.train.run.run_dir import RunError, entries, listing
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; choose another --name")
    names = entries(out) if out.exists() else []
    if names:
        if not is_rl_speedrun(out):
            raise RunError(f"{out} exists and is not an RL speedrun (it holds {listing(names)}); "
                           "choose another --name")
        if not overwrite:
            raise RunError(f"{out} holds an RL speedrun; pass --overwrite to replace it (deletes "
                           "only its own files) or choose another --name")
        for name in OWN:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(MARKER))


def is_rl_speedrun(out: Path) -> bool:
    try:
        return json.loads((out / "run.json").read_text()).get("nanoseek") == "speedrun-rl"
    except (OSError, ValueError, AttributeError):
        return False


def sft_stage(base: Path, out: Path, threshold: float, minutes: float, eval_n: int, log,
              adapt_threads: bool = False, progress: bool = False, **train) -> dict:
    """SFT on the task's demonstrations, evaluated every 10 steps on `eval_n` held-out
    problems, stopped at `threshold` accuracy (or the time budget). `train`: more
    TrainConfig fields (precision, compile). progress: the loop's bar on stderr (its total
    is the step cap; the accuracy threshold or the time budget ends it sooner)."""
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    cfg = SFTConfig(init=str(base), task="arithmetic", task_options=dict(RL_TASK), task_examples=4000,
                    epochs=100.0, eval_task_n=eval_n, stop_at_accuracy=threshold,
                    train=sft_train_config(max_steps=2000, batch_size=16, seq_len=256, lr=2e-3,
                                           warmup_steps=20, schedule="constant", eval_every=10,
                                           save_every=0, time_limit=minutes * 60, **train))
    run = sft(out, cfg, progress=progress, log=lambda *a: None, adapt_threads=adapt_threads)
    evals = [r for r in _metrics(out) if r.get("kind") == "eval"]
    acc = evals[-1]["accuracy"] if evals else 0.0
    log(f"      SFT stopped at step {run['summary']['steps']}: held-out accuracy {acc:.3f} "
        f"({run['summary']['target_reached'] or 'time budget spent'})")
    return {"steps": run["summary"]["steps"], "accuracy": acc, "seconds": run["summary"]["elapsed"],
            "reached": run["summary"]["target_reached"], "precision": run.get("precision")}


def grpo_stage(sft_dir: Path, out: Path, steps: int, minutes: float, eval_n: int,
               adapt_threads: bool = False, progress: bool = False, **train) -> dict:
    """GRPO: 32 prompts x G=8 per step, lr 2e-4 after 10 warm-up steps, k3 KL (beta 0.02).
    Measured from a 38 % SFT checkpoint (docs/rl.md): lr 2e-4 gained, 3e-4 gained less, and
    5e-4 (or 3e-4 with 8 prompts a step) collapsed within 20-30 steps; at 16 prompts a step
    the held-out accuracy swung by 10 points between evaluations, at 32 it climbed more
    steadily (the packed update, shared_prefix.py, pays for the second 16)."""
    from nanoseek.train.rl.config import RLConfig, rl_train_config
    from nanoseek.train.rl.run import rl
    cfg = RLConfig(init=str(sft_dir), task="arithmetic", task_options=dict(RL_TASK),
                   train=rl_train_config(max_steps=steps, batch_size=32, lr=2e-4, warmup_steps=10,
                                         eval_every=10, save_every=20, time_limit=minutes * 60, **train),
                   num_generations=8, beta=0.02, eval_n=eval_n, max_completion_length=64)
    run = rl(out, cfg, progress=progress, log=lambda *a: None, adapt_threads=adapt_threads)
    return {**run["summary"], "precision": run["precision"]}


def speedrun_rl(name: str = "speedrun-rl", root: str | Path = "runs", base: str | Path | None = None,
                pretrain_minutes: float = 3.0, sft_minutes: float = 8.0, grpo_steps: int = 100,
                grpo_minutes: float = 8.0,
                threshold: float = 0.3, eval_n: int = 400, threads: int = 0, overwrite: bool = False,
                log=print, stage_eval_n: int = 200, precision: str = "auto", compile: str = "auto",
                progress: bool = True, optimizer: str = "adamw", fp4_experts_from: int | None = None) -> Path:
    """Every stage; returns the report's path. `base`: a pretrained checkpoint to start
    from (e.g. runs/speedrun) instead of pretraining here. `threads` for SFT and GRPO: 0 =
    adaptive (all cores, one when that is faster on a crowded machine: train/numerics/threads.py).
    `stage_eval_n`: held-out problems of the evaluations inside SFT and GRPO. `precision`,
    `compile`, `optimizer`: every training stage's (TrainConfig: pretraining when there is no
    `base`, SFT, GRPO's updates; the rollouts run in the engine's fp32). `progress`: every training
    stage's bar on stderr (the stage lines go to `log`). `fp4_experts_from`: every training
    stage's TrainConfig.fp4_experts_from (each stage counts its own steps)."""
    import torch
    from nanoseek.data.tasks import load_task
    from nanoseek.recipes.speedrun import speedrun
    from nanoseek.train.eval import evaluate_task

    t_start = time.perf_counter()
    out = Path(root) / name
    prepare_dir(out, overwrite)
    task = load_task("arithmetic", **RL_TASK)
    given_base = base is not None
    if base is None:
        log(f"[1/5] tokenizer + pretraining ({pretrain_minutes:g} min)")
        speedrun("pretrain", out, minutes=pretrain_minutes, progress=progress, log=lambda *a: None,
                 precision=precision, compile=compile, optimizer=optimizer, fp4_experts_from=fp4_experts_from)
        base = out / "pretrain"
    else:
        log(f"[1/5] pretrained checkpoint: {base}")
    adapt = threads == 0
    if adapt:
        from nanoseek.train.pretrain import setup_threads
        setup_threads()
    else:
        torch.set_num_threads(threads)
    log(f"[2/5] SFT on {RL_TASK} demonstrations until held-out accuracy >= {threshold:.0%} "
        f"(at most {sft_minutes:g} min)")
    stage_train = dict(precision=precision, compile=compile, optimizer=optimizer, progress=progress,
                       fp4_experts_from=fp4_experts_from)
    sft = sft_stage(Path(base), out / "sft", threshold, sft_minutes, stage_eval_n, log, adapt, **stage_train)
    log(f"[3/5] GRPO from the SFT checkpoint: {grpo_steps} steps (at most {grpo_minutes:g} min)")
    grpo = grpo_stage(out / "sft", out / "grpo", grpo_steps, grpo_minutes, stage_eval_n, adapt, **stage_train)
    log(f"[4/5] held-out evaluation: {eval_n} problems, greedy, SFT vs GRPO")
    before = evaluate_task(out / "sft", task, n=eval_n, k=0, seed=1)
    after = evaluate_task(out / "grpo", task, n=eval_n, k=0, seed=1)
    total = time.perf_counter() - t_start
    gain = 100 * (after["accuracy"] - before["accuracy"])
    log(f"      accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} ({gain:+.1f} points)")
    pretrain_s = pretraining_seconds(Path(base)) if given_base else None
    path = report(out, base, sft, grpo, before, after, eval_n, total, threshold, pretrain_s,
                  "adaptive (all cores, or one when faster)" if adapt else str(threads))
    (out / "result.json").write_text(json.dumps(
        {"before": before, "after": after, "gain_points": gain, "seconds": total, "sft": sft,
         "grpo": grpo, "base": str(base)}, indent=2, default=str))
    log(f"[5/5] report: {path}  ({total / 60:.1f} min in all)")
    return path


def report(out: Path, base, sft: dict, grpo: dict, before: dict, after: dict, eval_n: int,
           total: float, threshold: float, pretrain_s: float | None, threads: str = "") -> Path:
    from nanoseek.reports.rl_report import write_rl_report
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    extra = {"task": f"arithmetic {RL_TASK} (column-by-column demonstrations, R1 answer format)",
             "pretrained checkpoint": str(base),
             "SFT": f"{sft['steps']} steps in {sft['seconds']:.0f} s, stopped "
                    f"{'at the ' + pct(threshold) + ' threshold' if sft['reached'] else 'by its time budget'}"
                    f" (held-out accuracy {pct(sft['accuracy'])})",
             "GRPO": f"{grpo['steps']} steps in {grpo['elapsed']:.0f} s",
             "torch threads (SFT, GRPO)": threads,
             "precision of the updates (SFT, GRPO; rollouts in fp32)":
                 f"{sft.get('precision')}, {grpo.get('precision')}",
             "wall time of these stages (s)": f"{total:.0f}"}
    if pretrain_s is not None:  # a --base speedrun: its own time, then these stages
        extra["wall time with the pretraining speedrun before it (s)"] = \
            f"{pretrain_s + total:.0f} ({pretrain_s:.0f} + {total:.0f})"
    table = ["| held-out, greedy, same problems | SFT (start) | after GRPO | change |",
             "|---|---|---|---|",
             f"| accuracy ({eval_n} problems) | {pct(before['accuracy'])} | {pct(after['accuracy'])} | "
             f"{100 * (after['accuracy'] - before['accuracy']):+.1f} points |",
             f"| format followed | {pct(before['format'])} | {pct(after['format'])} | "
             f"{100 * (after['format'] - before['format']):+.1f} points |",
             f"| mean reward | {before['mean_reward']:.3f} | {after['mean_reward']:.3f} | "
             f"{after['mean_reward'] - before['mean_reward']:+.3f} |"]
    notes = ["The loss of GRPO reads ~0 by construction (zero-mean group advantages, ratio 1 "
             "on the first pass); reward and held-out accuracy are what to read.",
             "Labels exist for this task: continuing SFT is the efficient choice; GRPO is run "
             "to show its effect from an SFT starting point, measured on the same problems."]
    return write_rl_report(out, {"GRPO": out / "grpo"}, "nanoseek RL speedrun", extra, notes, table)


def pretraining_seconds(base: Path) -> float | None:
    """The wall time a pretraining speedrun recorded in its run.json, if `base` is one."""
    try:
        extra = json.loads((base / "run.json").read_text()).get("report_extra") or {}
        return float(extra["speedrun wall time, all stages (s)"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    from nanoseek.train.run.metrics import read_metrics
    return read_metrics(run_dir)
