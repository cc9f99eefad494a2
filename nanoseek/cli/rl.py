"""RL commands: `nanoseek grpo --model SFT_DIR --task arithmetic --out DIR [--algo ppo]`, and
`nanoseek speedrun-rl` (pretraining -> SFT -> GRPO -> held-out evaluation -> report)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli import launch_options as parallel
from nanoseek.cli.common import compile_option, deprecated_option, pick, precision_given, precision_option
from nanoseek.cli.run_config import config_option
from nanoseek.cli.settings import FROM_FIELD, option
from nanoseek.train.config import TrainConfig
from nanoseek.train.rl.config import RLConfig


def grpo(
        config: Optional[Path] = config_option(),
        out: Path = typer.Option(..., "--out", help="run directory (becomes the policy's HF checkpoint)"),
        model: Optional[Path] = typer.Option(None, "--model", help="starting checkpoint, e.g. an SFT run (not needed with --resume)"),
        init: Optional[Path] = deprecated_option(None, "--init", "--model"),
        task: str = option(RLConfig, "task", FROM_FIELD, "--task"),
        option: Optional[list[str]] = typer.Option(None, "--option", help="task option KEY=VALUE (repeat), e.g. digits=2"),
        algo: str = option(RLConfig, "algo"),
        max_steps: int = option(TrainConfig, "max_steps", 100),
        batch_size: int = option(TrainConfig, "batch_size", 16, help="prompts per rollout"),
        num_generations: int = option(RLConfig, "num_generations"),
        grad_accum: int = option(TrainConfig, "grad_accum", 1),
        lr: float = option(TrainConfig, "lr", 3e-4, help="learning rate (<= 3e-4 on tiny models: see docs/rl.md)"),
        warmup_steps: int = option(TrainConfig, "warmup_steps", 10),
        temperature: float = option(RLConfig, "temperature"),
        max_completion_length: Optional[int] = option(RLConfig, "max_completion_length"),
        loss_type: str = option(RLConfig, "loss_type"),
        scale_rewards: str = option(RLConfig, "scale_rewards"),
        epsilon: float = option(RLConfig, "epsilon"),
        epsilon_high: Optional[float] = option(RLConfig, "epsilon_high"),
        beta: float = option(RLConfig, "beta"),
        use_bias_correction_kl: bool = option(RLConfig, "use_bias_correction_kl", FROM_FIELD, "--use-bias-correction-kl"),
        num_iterations: int = option(RLConfig, "num_iterations"),
        mask_truncated_completions: bool = option(RLConfig, "mask_truncated_completions", FROM_FIELD, "--mask-truncated-completions"),
        drop_equal_groups: bool = option(RLConfig, "drop_equal_groups", FROM_FIELD, "--drop-equal-groups"),
        eval_every: int = option(TrainConfig, "eval_every", 25, help="steps between held-out evaluations (0 = at the end only)"),
        eval_n: int = option(RLConfig, "eval_n"),
        save_every: int = option(TrainConfig, "save_every", 25, help="steps between checkpoints (0 = at the end only; a multiple of --num-iterations)"),
        seed: int = option(TrainConfig, "seed"),
        precision: Optional[str] = precision_option(),
        compile: Optional[str] = compile_option(),
        optimizer: Optional[str] = option(TrainConfig, "optimizer", None, default_note="adamw"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
        nproc: int = parallel.nproc_option("each rank samples its share of --batch-size prompts; RL runs data parallel, weights replicated"),
        ep: int = parallel.ep_option(),
        tp: int = parallel.tp_option(),
        pp: int = parallel.pp_option(),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """GRPO (or PPO) on a verifiable task with rollouts from nanoseek's engine; logs reward,
    accuracy, KL, clip fraction, lengths and rollout/update time to metrics.jsonl."""
    parallel.launch("grpo", nproc, ep, tp, pp)
    from nanoseek.cli.common import task_options
    from nanoseek.parallel import ParallelConfig, launch
    from nanoseek.train.rl.config import rl_train_config
    from nanoseek.train.rl.run import rl
    init = pick(model, init, "--model", "--init")
    if init is None and not resume:
        raise ValueError("--model is required (the checkpoint to start from)")
    train = rl_train_config(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                            lr=lr, warmup_steps=warmup_steps, eval_every=eval_every,
                            save_every=save_every or max_steps * num_iterations, seed=seed,
                            fp4_experts_from=fp4_experts_from,
                            **precision_given(resume, precision=precision, compile=compile,
                                              optimizer=optimizer))
    cfg = RLConfig(init=str(init or ""), task=task, task_options=task_options(option or []),
                   algo=algo, train=train, num_generations=num_generations, temperature=temperature,
                   max_completion_length=max_completion_length, loss_type=loss_type,
                   scale_rewards=scale_rewards, epsilon=epsilon, epsilon_high=epsilon_high,
                   beta=beta, use_bias_correction_kl=use_bias_correction_kl,
                   num_iterations=num_iterations,
                   mask_truncated_completions=mask_truncated_completions,
                   drop_equal_groups=drop_equal_groups, eval_n=eval_n)
    layout = ParallelConfig(ep=ep, tp=tp, pp=pp) if (ep, tp, pp) != (1, 1, 1) else None
    run = rl(out, cfg, resume=resume, progress=not no_progress, log=typer.echo,
             **({"parallel": layout} if layout else {}))
    if not launch.is_main():
        return
    s, start, end = run["summary"], run["start_eval"] or {}, run["final_eval"] or {}
    typer.echo(f"done: {s['steps']} steps in {s['elapsed']:.0f}s; held-out accuracy "
               f"{start.get('accuracy', float('nan')):.3f} -> {end.get('accuracy', float('nan')):.3f} -> {out}")


def speedrun_rl(
        config: Optional[Path] = config_option(),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: ROOT/NAME, i.e. runs/speedrun-rl)"),
        name: str = typer.Option("speedrun-rl", help="run name: writes ROOT/NAME/report.md"),
        root: Path = typer.Option(Path("runs"), help="parent directory of runs"),
        model: Optional[Path] = typer.Option(None, "--model", help="a pretrained checkpoint (e.g. runs/speedrun) instead of pretraining"),
        base: Optional[Path] = deprecated_option(None, "--base", "--model"),
        pretrain_minutes: float = typer.Option(3.0, help="pretraining budget (without --model)"),
        sft_minutes: float = typer.Option(8.0, help="SFT budget (it stops earlier at --threshold)"),
        grpo_steps: int = typer.Option(100, min=1, help="GRPO steps (32 prompts x 8 completions each)"),
        grpo_minutes: float = typer.Option(8.0, help="GRPO time budget (it stops earlier after --grpo-steps)"),
        threshold: float = typer.Option(0.3, help="held-out accuracy at which SFT hands over to GRPO"),
        eval_n: int = typer.Option(400, help="held-out problems of the before/after evaluation"),
        threads: int = typer.Option(0, min=0, help="torch threads for SFT and GRPO (0 = adaptive: all cores, one when a crowded machine makes that faster)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace the RL speedrun in runs/NAME (deletes only its own files)"),
        precision: str = precision_option("auto"),
        compile: str = compile_option("auto"),
        optimizer: str = option(TrainConfig, "optimizer"),
        fp4_experts_from: Optional[int] = option(
            TrainConfig, "fp4_experts_from",
            help="every training stage (pretraining without --model, SFT, GRPO) trains its routed "
            "experts through FP4 from its own step STEP on (0: throughout; the rollouts sample "
            "the FP4 experts); unset: never")):
    """SFT on 2-digit addition until a held-out accuracy threshold -> GRPO -> held-out
    evaluation of both on the same problems -> report with reward/accuracy curves and a
    before/after table. From --base (e.g. runs/speedrun), or pretraining first."""
    from nanoseek.recipes.speedrun_rl import speedrun_rl as run
    base = pick(model, base, "--model", "--base")
    if out is not None:
        root, name = out.parent, out.name
    run(name, root, base, pretrain_minutes, sft_minutes, grpo_steps, grpo_minutes, threshold, eval_n,
        threads, overwrite, log=typer.echo, precision=precision, compile=compile, optimizer=optimizer,
        fp4_experts_from=fp4_experts_from)


def register(app: typer.Typer) -> None:
    app.command()(grpo)
    app.command("speedrun-rl")(speedrun_rl)
