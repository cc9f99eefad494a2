"""`nanoseek distill --student DIR --teacher DIR --task T [--teacher DIR --task T ...] --out DIR`:
on-policy distillation (DeepSeek-V4) from one teacher per task into one student."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli import launch_options as parallel
from nanoseek.cli.common import compile_option, precision_given, precision_option
from nanoseek.cli.settings import option
from nanoseek.train.config import TrainConfig
from nanoseek.train.rl.config import RLConfig
from nanoseek.train.rl.distill_config import DistillConfig


def distill(
        out: Path = typer.Option(..., "--out", help="run directory (becomes the student's HF checkpoint)"),
        student: Optional[Path] = typer.Option(None, "--student", help="the student's starting checkpoint (e.g. a pretrained run; not needed with --resume)"),
        teacher: Optional[list[Path]] = typer.Option(None, "--teacher", help="a teacher checkpoint; repeat, one per --task, in the same order (teacher i scores task i's prompts)"),
        task: Optional[list[str]] = typer.Option(None, "--task", help="a task (arithmetic | countdown | tool_use | FILE.jsonl); repeat, one per --teacher"),
        option: Optional[list[str]] = typer.Option(None, "--option", help="task option TASK.KEY=VALUE (repeat), e.g. arithmetic.digits=2"),
        teacher_weight: Optional[list[float]] = typer.Option(None, "--teacher-weight", help="weight of teacher i's KL term (repeat, one per --teacher; default 1 each)"),
        samples_from: str = option(DistillConfig, "samples_from"),
        cold_start_steps: int = option(DistillConfig, "cold_start_steps"),
        on_policy_lr: Optional[float] = option(DistillConfig, "on_policy_lr"),
        max_steps: int = option(TrainConfig, "max_steps", 100),
        batch_size: int = option(TrainConfig, "batch_size", 16, help="prompts per step, split evenly over the tasks"),
        num_generations: int = option(DistillConfig, "num_generations"),
        grad_accum: int = option(TrainConfig, "grad_accum", 1),
        lr: float = option(TrainConfig, "lr", 3e-4),
        warmup_steps: int = option(TrainConfig, "warmup_steps", 10),
        temperature: float = option(RLConfig, "temperature"),
        max_completion_length: Optional[int] = option(RLConfig, "max_completion_length"),
        loss_type: str = option(RLConfig, "loss_type"),
        mask_truncated_completions: bool = option(RLConfig, "mask_truncated_completions", False, "--mask-truncated-completions"),
        eval_every: int = option(TrainConfig, "eval_every", 25, help="steps between held-out evaluations of every task (0 = at the end only)"),
        eval_n: int = option(RLConfig, "eval_n"),
        save_every: int = option(TrainConfig, "save_every", 25, help="steps between checkpoints (0 = at the end only)"),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0, help="stop after this many seconds of training"),
        seed: int = option(TrainConfig, "seed"),
        precision: Optional[str] = precision_option(),
        compile: Optional[str] = compile_option(),
        optimizer: Optional[str] = option(TrainConfig, "optimizer", None, default_note="adamw"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
        nproc: int = parallel.nproc_option("each rank samples its share of every task's prompts with its own engine; weights and teachers replicated"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """On-policy distillation (DeepSeek-V4): the student samples each task's prompts with
    nanoseek's engine, the task's teacher scores every token, and the loss is the
    full-vocabulary reverse KL(student || teacher) per token (docs/rl.md#on-policy-distillation).
    Logs the KL, rollout accuracy per task and held-out greedy accuracy of every task to
    metrics.jsonl. --samples-from teacher runs off-policy distillation instead (SFT on the
    teachers' own samples), for comparison."""
    parallel.launch("distill", nproc, 1, 1, 1)
    from nanoseek.parallel import launch
    from nanoseek.train.rl.config import rl_train_config
    from nanoseek.train.rl.distill import distill as run_distill
    if not resume and (student is None or not teacher or not task):
        raise ValueError("give --student, and one --teacher per --task (or --resume)")
    tasks = list(task or [])
    train = rl_train_config(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            warmup_steps=warmup_steps, eval_every=eval_every,
                            save_every=save_every or max_steps, seed=seed,
                            **({"time_limit": time_limit} if time_limit else {}),
                            fp4_experts_from=fp4_experts_from,
                            **precision_given(resume, precision=precision, compile=compile,
                                              optimizer=optimizer))
    cfg = DistillConfig(init=str(student or ""), teachers=[str(t) for t in teacher or []], tasks=tasks,
                        tasks_options=per_task_options(tasks, option or []),
                        teacher_weights=list(teacher_weight or []), samples_from=samples_from,
                        cold_start_steps=cold_start_steps, on_policy_lr=on_policy_lr, train=train, num_generations=num_generations, temperature=temperature,
                        max_completion_length=max_completion_length, loss_type=loss_type,
                        mask_truncated_completions=mask_truncated_completions, eval_n=eval_n)
    run = run_distill(out, cfg, resume=resume, progress=not no_progress, log=typer.echo)
    if not launch.is_main():
        return
    s, start, end = run["summary"], run["start_eval"] or {}, run["final_eval"] or {}
    per = ", ".join(f"{k.removeprefix('accuracy_')} {start.get(k, float('nan')):.3f} -> {v:.3f}"
                    for k, v in end.items() if k.startswith("accuracy_"))
    typer.echo(f"done: {s['steps']} steps in {s['elapsed']:.0f}s; held-out accuracy {per} -> {out}")


def per_task_options(tasks: list[str], pairs: list[str]) -> list[dict]:
    """--option TASK.KEY=VALUE -> one options dict per task (a TASK named twice gets both)."""
    from nanoseek.cli.common import task_options
    out = [{} for _ in tasks]
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or name not in tasks:
            raise typer.BadParameter(f"--option {pair!r}: expected TASK.KEY=VALUE with TASK one of "
                                     f"the --task values {tasks}")
        for i, t in enumerate(tasks):
            if t == name:
                out[i].update(task_options([rest]))
    return out


def register(app: typer.Typer) -> None:
    app.command()(distill)
