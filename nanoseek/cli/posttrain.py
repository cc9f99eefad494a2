"""Post-training commands: `nanoseek sft` (also `--nproc N`), `dpo` and `merge-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli import launch_options as parallel
from nanoseek.cli.common import compile_option, deprecated_option, pick, precision_given, precision_option
from nanoseek.cli.run_config import config_option
from nanoseek.cli.settings import FROM_FIELD, option
from nanoseek.train.config import TrainConfig
from nanoseek.train.posttrain.settings import LORA_TARGETS, DPOConfig, LoraSettings, PairSampling, SFTConfig

ALL_TARGETS = f"all of {', '.join(LORA_TARGETS)}"


def _lora(lora: bool, qlora: bool, r: int, alpha: float, targets: Optional[str]):
    if not (lora or qlora):
        return LoraSettings()
    if r < 1:  # r = 0 is LoraSettings' "no adapters", which --lora asks for
        raise typer.BadParameter(f"--lora-r must be >= 1 with --lora or --qlora, got {r}")
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else list(LORA_TARGETS)
    return LoraSettings(r=r, alpha=alpha, targets=names, qlora=qlora)


def _train(**kw):
    """The TrainConfig options given on the command line (the stage's defaults otherwise)."""
    return {k: v for k, v in kw.items() if v is not None}


def _start(model: Optional[Path], init: Optional[Path], required: bool = True) -> Optional[Path]:
    """--model, or its old spelling --init."""
    start = pick(model, init, "--model", "--init")
    if start is None and required:
        raise ValueError("--model is required (the checkpoint to start from)")
    return start


def sft(
        config: Optional[Path] = config_option(),
        model: Optional[Path] = typer.Option(None, "--model", help="checkpoint + tokenizer to start from (e.g. a pretraining run) (required)"),
        init: Optional[Path] = deprecated_option(None, "--init", "--model"),
        out: Path = typer.Option(..., "--out", help="run directory: the fine-tuned checkpoint (or adapter) + tokenizer"),
        data: Optional[list[Path]] = option(SFTConfig, "data", None, "--data"),
        task: Optional[str] = option(SFTConfig, "task", None, "--task"),
        task_examples: int = option(SFTConfig, "task_examples"),
        option: Optional[list[str]] = typer.Option(None, "--option", help="task option KEY=VALUE (repeat), e.g. digits=2"),
        epochs: float = option(SFTConfig, "epochs"),
        max_steps: Optional[int] = option(TrainConfig, "max_steps", None, default_note="from --epochs"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
        batch_size: Optional[int] = option(TrainConfig, "batch_size", None, help="windows per micro-batch", default_note="8"),
        seq_len: Optional[int] = option(TrainConfig, "seq_len", None, help="tokens per window", default_note="256"),
        grad_accum: Optional[int] = option(TrainConfig, "grad_accum", None, default_note="1"),
        lr: Optional[float] = option(TrainConfig, "lr", None, default_note="5e-4; 2e-3 suits LoRA"),
        warmup_steps: Optional[int] = option(TrainConfig, "warmup_steps", None, default_note="10"),
        save_every: Optional[int] = option(TrainConfig, "save_every", None, default_note="100"),
        no_packing: bool = typer.Option(False, "--no-packing", help="one conversation per window"),
        val_fraction: float = option(SFTConfig, "val_fraction"),
        eval_every: Optional[int] = option(TrainConfig, "eval_every", None, help="steps between evaluations (val_loss, --eval-n accuracy; 0 = at the end only)", default_note="0"),
        eval_n: int = option(SFTConfig, "eval_task_n", FROM_FIELD, "--eval-n"),
        stop_at_accuracy: Optional[float] = option(SFTConfig, "stop_at_accuracy"),
        lora: bool = typer.Option(False, "--lora", help="train LoRA adapters (peft) over the frozen model"),
        qlora: bool = option(LoraSettings, "qlora", FROM_FIELD, "--qlora"),
        lora_r: int = option(LoraSettings, "r", 8, "--lora-r"),
        lora_alpha: float = option(LoraSettings, "alpha", FROM_FIELD, "--lora-alpha"),
        lora_targets: Optional[str] = option(LoraSettings, "targets", None, "--lora-targets", default_note=ALL_TARGETS),
        merge: bool = option(SFTConfig, "merge", FROM_FIELD, "--merge"),
        vision: Optional[str] = option(SFTConfig, "vision", None, "--vision"),
        train_vision: bool = option(SFTConfig, "train_vision", FROM_FIELD, "--train-vision"),
        tower_reading_steps: int = option(SFTConfig, "tower_reading_steps", FROM_FIELD, "--tower-reading-steps"),
        tower_reading_minutes: float = option(SFTConfig, "tower_reading_minutes", FROM_FIELD, "--tower-reading-minutes"),
        seed: Optional[int] = option(TrainConfig, "seed", None, help="data order and held-out split", default_note="1337"),
        precision: Optional[str] = precision_option(),
        compile: Optional[str] = compile_option(),
        optimizer: Optional[str] = option(TrainConfig, "optimizer", None, default_note="adamw"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        nproc: int = parallel.nproc_option("each data-parallel rank trains on its rows of --batch-size"),
        ep: int = parallel.ep_option(),
        tp: int = parallel.tp_option(),
        pp: int = parallel.pp_option(),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """Supervised fine-tuning on chat data: DeepSeek-V3's chat template, loss on the
    assistant's tokens only, packing; full, LoRA or QLoRA; resumable; on several
    processes with --nproc. Rows with images train a DeepSeek-VL model (--vision tiny-vl
    adds a vision tower to --model; --tower-reading-minutes first teaches that fresh tower to
    read a task's pictures)."""
    parallel.launch("sft", nproc, ep, tp, pp)
    init = _start(model, init)
    from nanoseek.cli.common import task_options
    from nanoseek.parallel import ParallelConfig, launch
    from nanoseek.train.posttrain.sft import sft as run_sft, sft_train_config
    settings = SFTConfig(
        init=str(init), data=[str(p) for p in data or []], task=task, task_examples=task_examples,
        task_options=task_options(option or []),
        epochs=epochs, packing=not no_packing, val_fraction=val_fraction, merge=merge,
        eval_task_n=eval_n, stop_at_accuracy=stop_at_accuracy, vision=vision, train_vision=train_vision,
        tower_reading_steps=tower_reading_steps, tower_reading_minutes=tower_reading_minutes,
        lora=_lora(lora, qlora, lora_r, lora_alpha, lora_targets),
        train=sft_train_config(**_train(max_steps=max_steps, batch_size=batch_size, seq_len=seq_len,
                                        grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                                        save_every=save_every, eval_every=eval_every, seed=seed,
                                        fp4_experts_from=fp4_experts_from,
                                        **precision_given(resume, precision=precision, compile=compile,
                                                          optimizer=optimizer))))
    run = run_sft(out, settings, resume=resume, max_steps=max_steps, progress=not no_progress,
                  parallel=ParallelConfig(ep=ep, tp=tp, pp=pp))
    if launch.is_main():
        typer.echo(f"done: {run['summary']['steps']} steps; loss on assistant tokens "
                   f"{run['loss_before']:.4f} -> {run['loss_after']:.4f} -> {out}")


def dpo(
        config: Optional[Path] = config_option(),
        model: Optional[Path] = typer.Option(None, "--model", help="checkpoint + tokenizer to start from (e.g. an SFT run) (required)"),
        init: Optional[Path] = deprecated_option(None, "--init", "--model"),
        out: Path = typer.Option(..., "--out", help="run directory"),
        data: Optional[list[Path]] = option(DPOConfig, "data", None, "--data"),
        task: Optional[str] = option(DPOConfig, "task", None, "--task"),
        option: Optional[list[str]] = typer.Option(None, "--option", help="task option KEY=VALUE (repeat), e.g. digits=2"),
        pairs_from_sampling: bool = typer.Option(False, "--pairs-from-sampling", help="build pairs from the init model's samples scored by the task's reward"),
        prompts: int = option(PairSampling, "prompts"),
        samples: int = option(PairSampling, "samples"),
        temperature: float = option(PairSampling, "temperature"),
        max_tokens: int = option(PairSampling, "max_tokens"),
        beta: float = option(DPOConfig, "beta"),
        epochs: float = option(DPOConfig, "epochs"),
        max_steps: Optional[int] = option(TrainConfig, "max_steps", None, default_note="from --epochs"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
        batch_size: Optional[int] = option(TrainConfig, "batch_size", None, help="pairs per micro-batch", default_note="8"),
        seq_len: Optional[int] = option(TrainConfig, "seq_len", None, help="longest prompt + completion", default_note="256"),
        grad_accum: Optional[int] = option(TrainConfig, "grad_accum", None, default_note="1"),
        lr: Optional[float] = option(TrainConfig, "lr", None, default_note="1e-4"),
        warmup_steps: Optional[int] = option(TrainConfig, "warmup_steps", None, default_note="5"),
        save_every: Optional[int] = option(TrainConfig, "save_every", None, default_note="100"),
        lora: bool = typer.Option(False, "--lora", help="LoRA adapters; the reference is the base with adapters off"),
        qlora: bool = option(LoraSettings, "qlora", FROM_FIELD, "--qlora"),
        lora_r: int = option(LoraSettings, "r", 8, "--lora-r"),
        lora_alpha: float = option(LoraSettings, "alpha", FROM_FIELD, "--lora-alpha"),
        lora_targets: Optional[str] = option(LoraSettings, "targets", None, "--lora-targets", default_note=ALL_TARGETS),
        merge: bool = option(DPOConfig, "merge", FROM_FIELD, "--merge"),
        seed: Optional[int] = option(TrainConfig, "seed", None, help="pair order and sampling seed", default_note="1337"),
        precision: Optional[str] = precision_option(),
        compile: Optional[str] = compile_option(),
        optimizer: Optional[str] = option(TrainConfig, "optimizer", None, default_note="adamw"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """Direct Preference Optimization (sigmoid loss against a frozen reference) on
    preference pairs from a file or sampled on a task."""
    from nanoseek.cli.common import task_options
    from nanoseek.train.posttrain.dpo import dpo as run_dpo, dpo_train_config
    init = _start(model, init)
    if task and not pairs_from_sampling:
        raise typer.BadParameter("--task needs --pairs-from-sampling (DPO learns from pairs)")
    settings = DPOConfig(
        init=str(init), data=[str(p) for p in data or []], task=task,
        task_options=task_options(option or []), beta=beta, epochs=epochs,
        sampling=PairSampling(prompts, samples, temperature, max_tokens), merge=merge,
        lora=_lora(lora, qlora, lora_r, lora_alpha, lora_targets),
        train=dpo_train_config(**_train(max_steps=max_steps, batch_size=batch_size, seq_len=seq_len,
                                        grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                                        save_every=save_every, seed=seed,
                                        fp4_experts_from=fp4_experts_from,
                                        **precision_given(resume, precision=precision, compile=compile,
                                                          optimizer=optimizer))))
    run = run_dpo(out, settings, resume=resume, max_steps=max_steps, progress=not no_progress)
    b, a = run["before"], run["after"]
    typer.echo(f"done: {run['summary']['steps']} steps; reward accuracy {b['reward_accuracy']:.3f} -> "
               f"{a['reward_accuracy']:.3f}, policy prefers chosen {b['policy_accuracy']:.3f} -> "
               f"{a['policy_accuracy']:.3f} -> {out}")


def merge_lora(
        model: Optional[Path] = typer.Option(None, "--model", help="the base checkpoint the adapter was trained on (required)"),
        base: Optional[Path] = deprecated_option(None, "--base", "--model"),
        adapter: Path = typer.Option(..., "--adapter", help="directory with adapter_config.json + adapter_model.safetensors"),
        out: Path = typer.Option(..., "--out", help="where to write the merged checkpoint")):
    """Fold a LoRA adapter into its base: a plain checkpoint for `generate` and `serve`."""
    from nanoseek.train.posttrain.lora import merge_lora as merge
    base = _start(model, base)
    typer.echo(f"merged -> {merge(base, adapter, out)}")


def register(app: typer.Typer) -> None:
    app.command()(sft)
    app.command()(dpo)
    app.command("merge-lora")(merge_lora)
