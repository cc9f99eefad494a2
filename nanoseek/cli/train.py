"""Training commands: `nanoseek tokenizer train`, `pretrain`, `speedrun`, `eval`, `report`, `peak`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def tokenizer_train(
        out: Path = typer.Option(..., "--out", help="directory to write tokenizer.json + tokenizer_config.json into"),
        data: Optional[list[Path]] = typer.Option(None, "--data", help=".txt/.jsonl/.parquet files or directories (repeat); default: the embedded pydoc corpus"),
        vocab_size: int = typer.Option(4096, help="vocabulary size, special tokens included"),
        text_field: str = typer.Option("text", help="column holding the text in .jsonl/.parquet files")):
    """Train a byte-level BPE (digits split one by one) with DeepSeek's special tokens and
    chat template; transformers.AutoTokenizer loads the result."""
    from nanoseek.data import load_corpus
    from nanoseek.tokenizer import save_tokenizer, train_tokenizer
    docs = load_corpus(data, text_field)
    tok = train_tokenizer(docs, vocab_size)
    save_tokenizer(tok, out)
    typer.echo(f"tokenizer with {len(tok)} tokens trained on {len(docs)} documents -> {out}")


def pretrain(
        out: Path = typer.Option(..., "--out", help="run directory (becomes an HF checkpoint), e.g. runs/NAME"),
        preset: str = typer.Option("tiny", help="model preset (ignored with --config)"),
        config: Optional[Path] = typer.Option(None, "--config", help="model config.json (HF DeepseekV3 fields)"),
        data: Optional[list[Path]] = typer.Option(None, "--data", help=".txt/.jsonl/.parquet files or directories (repeat); default: the embedded pydoc corpus"),
        text_field: str = typer.Option("text", help="column holding the text in .jsonl/.parquet files"),
        tokenizer: Optional[Path] = typer.Option(None, help="directory with a trained tokenizer (default: train one on the data)"),
        max_steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default 1000; with --resume, the run's own)"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
        batch_size: int = typer.Option(8, min=1, help="sequences per micro-batch"),
        seq_len: int = typer.Option(256, min=1, help="tokens per sequence (at most the model's max_position_embeddings)"),
        grad_accum: int = typer.Option(1, min=1, help="micro-batches per optimizer step"),
        lr: float = typer.Option(3e-3, help="peak learning rate"),
        warmup_steps: int = typer.Option(30, help="linear warm-up steps"),
        schedule: str = typer.Option("cosine", help="cosine | wsd | constant"),
        weight_decay: float = typer.Option(0.1, help="AdamW decoupled weight decay (matrices only)"),
        grad_clip: float = typer.Option(1.0, help="gradient-norm clipping (0 = off)"),
        precision: str = typer.Option("auto", help="auto (bf16 where the device has fast bf16: CUDA with bf16, a CPU with AMX/AVX512-BF16; else fp32) | fp32 | bf16 | fp16 (with a gradient scaler)"),
        compile: str = typer.Option("auto", "--compile", help="torch.compile of the blocks: auto (off: it does not pay on CPU; not measured on CUDA) | on | off"),
        router_z_loss: Optional[float] = typer.Option(None, help="router z-loss coefficient (overrides the config)"),
        eval_every: int = typer.Option(100, help="steps between validations"),
        eval_tokens: int = typer.Option(0, help="validation tokens per evaluation (0 = all)"),
        save_every: int = typer.Option(100, help="steps between checkpoints"),
        sample_every: int = typer.Option(0, help="steps between samples (0 = at the end only)"),
        sample_tokens: int = typer.Option(48, help="tokens per sample (0 = no samples)"),
        time_limit: Optional[float] = typer.Option(None, help="stop after this many seconds of training (0 = none; with --resume, the run's own unless given)"),
        seed: int = typer.Option(1337),
        val_fraction: float = typer.Option(0.1, help="share of documents held out for validation"),
        threads: Optional[int] = typer.Option(None, min=0, help="torch threads (default: all cores; 0 = adapt between all cores and one while training)"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """Pretrain a DeepSeek-V3-style model: tokenizer, token arrays, AdamW with warm-up +
    cosine/WSD, MTP and balance losses, the aux-loss-free bias update, atomic resumable
    checkpoints. The run directory loads with transformers' AutoModelForCausalLM."""
    from nanoseek.cli.common import load_config
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig
    from nanoseek.train.pretrain import pretrain as run_pretrain
    cfg = load_config(None if config else preset, config)
    if router_z_loss is not None:
        cfg = cfg.replace(router_z_loss_coef=router_z_loss)
    settings = PretrainConfig(
        model=cfg,
        train=TrainConfig(max_steps=max_steps or 1000, batch_size=batch_size, seq_len=seq_len,
                          grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                          schedule=schedule, weight_decay=weight_decay, grad_clip=grad_clip,
                          precision=precision, compile=compile, eval_every=eval_every, eval_tokens=eval_tokens,
                          save_every=save_every, sample_every=sample_every,
                          time_limit=time_limit or 0.0, seed=seed),
        data=DataConfig(paths=data or [], text_field=text_field, val_fraction=val_fraction,
                        tokenizer=tokenizer),
        sample_tokens=sample_tokens)
    # on --resume the run's saved settings rule; only the flags given here change them
    given = {"train.max_steps": max_steps, "train.time_limit": time_limit,
             "data.paths": settings.data.paths or None,
             "data.text_field": text_field if data else None}
    steps_before = _finished_steps(out) if resume else None
    run = run_pretrain(out, settings, resume=resume, progress=not no_progress, threads=threads,
                       overrides={k: v for k, v in given.items() if v is not None})
    typer.echo(_done_line(out, run["summary"], steps_before))


def _finished_steps(out: Path) -> int | None:
    """Steps of the run in `out` if it had finished (run.json holds a summary), else None."""
    import json
    try:
        return json.loads((out / "run.json").read_text())["summary"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _done_line(out: Path, s: dict, steps_before: int | None) -> str:
    """The last line of `pretrain`. Resuming a finished run trains nothing: say so rather
    than reprint the old run's figures as if they were new."""
    if steps_before is not None and s["steps"] == steps_before:
        return (f"nothing to do: the run in {out} already finished at step {s['steps']} "
                f"(pass --max-steps above {s['steps']} to train further)")
    return f"done: {s['steps']} steps, {s['tokens_seen']:,} tokens, {s['tok_s']:,.0f} tok/s -> {out}"


def speedrun(
        name: str = typer.Option("speedrun", help="run name: writes runs/NAME/report.md"),
        root: Path = typer.Option(Path("runs"), help="parent directory of runs"),
        minutes: float = typer.Option(7.0, help="training time budget in minutes"),
        max_steps: int = typer.Option(300, help="training steps if time allows"),
        threads: int = typer.Option(0, min=0, help="torch threads (0 = adapt between all cores and one while training: on a crowded machine one thread can be faster)"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """The whole pipeline on the embedded corpus with the tiny preset: tokenizer,
    pretraining, evaluation, report (about 5 minutes on a 2-core CPU, 7 minutes of training at most)."""
    from nanoseek.speedrun import speedrun as run_speedrun
    run_speedrun(name, root, minutes, max_steps, progress=not no_progress, threads=threads)


def report(run_dir: Path = typer.Argument(..., help="run directory (with run.json and metrics.jsonl)")):
    """(Re)write a run's report.md and plots from its metrics, even mid-run."""
    from nanoseek.report import write_report
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}: no run.json (not a run directory)")
    typer.echo(str(write_report(run_dir)))


def eval_(run_dir: Path = typer.Argument(..., help="run directory (checkpoint + tokenizer + data/)"),
          seq_len: Optional[int] = typer.Option(None, min=1, help="window length (default: the run's own seq_len)")):
    """Validation loss and bits per byte of a saved checkpoint on its run's held-out split."""
    from nanoseek.train.eval import evaluate_run
    ev = evaluate_run(run_dir, seq_len)
    typer.echo(f"val_loss={ev['val_loss']:.4f} val_bpb={ev['val_bpb']:.4f} tokens={ev['val_tokens']}")


def peak(remeasure: bool = typer.Option(False, help="measure again (keeps the higher figure)")):
    """This machine's measured matmul peak (the denominator of MFU)."""
    from nanoseek.train.mfu import measure_peak_flops
    from nanoseek.train.pretrain import default_device, setup_threads
    setup_threads()
    f = measure_peak_flops(default_device(), remeasure=remeasure)
    typer.echo(f"{f / 1e9:.1f} GFLOP/s")


def register(app: typer.Typer) -> None:
    tokenizer = typer.Typer(help="Train byte-level BPE tokenizers with DeepSeek's special tokens.",
                            no_args_is_help=True)
    tokenizer.command("train")(tokenizer_train)
    app.add_typer(tokenizer, name="tokenizer")
    app.command()(pretrain)
    app.command()(speedrun)
    app.command()(report)
    app.command("eval")(eval_)
    app.command()(peak)
