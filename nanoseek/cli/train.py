"""Training commands: `nanoseek tokenizer train`, `pretrain`, `speedrun`, `eval`, `report`, `peak`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli import launch_options as parallel
from nanoseek.cli.common import compile_option, deprecated_option, precision_given, precision_option
from nanoseek.cli.run_config import CONFIG_HELP, config_option
from nanoseek.cli.run_config import apply as apply_run_config
from nanoseek.cli.settings import option
from nanoseek.text.special_tokens import SPECIAL_TOKENS
from nanoseek.train.config import TrainConfig
from nanoseek.train.run.run_settings import PRETRAIN_DEFAULTS, DataConfig, PretrainConfig, pretrain_train_config


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False):
    """A typer callback: the value (if given) lies in the range and is finite, else one line
    naming the flag and the limit (typer's own min/max let NaN through for floats)."""
    def check(value):
        if value is None:
            return value
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        high_ok = hi is None or (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and low_ok and high_ok):
            left = "(" if lo_open else "["
            right = ")" if hi_open or hi is None else "]"
            span = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
            raise typer.BadParameter(f"must be a finite number in {span}, got {value}")
        return value
    return check


def _preset_help() -> str:
    """--preset's help: what each CPU preset trains, then the published shapes."""
    from nanoseek.config import PRESETS
    published = ", ".join(p for p in PRESETS if not p.startswith("tiny"))
    return ("model preset (ignored with --model-config): tiny = DeepSeek-V3 in miniature (MLA, "
            "DeepSeekMoE, MTP); tiny-v32 = DeepSeek-V3.2 (tiny + a lightning indexer and top-k "
            "sparse attention in every MLA layer, trained by its KL loss); tiny-v4 = DeepSeek-V4 "
            "(sliding-window, compressed sparse (CSA) and heavily compressed (HCA) attention, "
            f"mHC residual streams, hash-routed and learned MoE, MTP); published shapes: {published}")


COUNT = _range(0)  # a count where 0 means off / only at the end, as each flag's help says
POSITIVE = _range(1)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the bytes + DeepSeek's special tokens


def tokenizer_train(
        out: Path = typer.Option(..., "--out", help="directory to write tokenizer.json + tokenizer_config.json into"),
        data: Optional[list[Path]] = typer.Option(None, "--data", help=".txt/.jsonl/.parquet files or directories (repeat); default: the embedded pydoc corpus"),
        vocab_size: int = typer.Option(4096, callback=_range(MIN_VOCAB, 1 << 20), help=f"vocabulary size, special tokens included ({MIN_VOCAB} to 1048576)"),
        text_field: str = typer.Option("text", help="column holding the text in .jsonl/.parquet files"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace tokenizer files already in --out")):
    """Train a byte-level BPE (digits split one by one) with DeepSeek's special tokens and
    chat template; transformers.AutoTokenizer loads the result."""
    from nanoseek.data import load_corpus
    from nanoseek.text.tokenizer import TOKENIZER_FILES, save_tokenizer, train_tokenizer
    there = [f for f in TOKENIZER_FILES if (out / f).exists()]
    if there and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(there)}; pass --overwrite to "
                              "replace them or choose another --out")
    docs = load_corpus(data, text_field)
    tok = train_tokenizer(docs, vocab_size)
    save_tokenizer(tok, out)
    typer.echo(f"tokenizer with {len(tok)} tokens trained on {len(docs)} documents -> {out}")


# flags that a resumed run takes from the command line; every other one it ignores (the
# run's saved settings rule) and says so
RESUME_FLAGS = {"out", "resume", "overwrite", "max_steps", "time_limit", "data", "text_field",
                "threads", "no_progress", "nproc", "ep", "tp", "pp"}  # launch layout: any on resume


def _pretrain_config(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """--config run.toml; a .json file is the old spelling of --model-config (a model's
    config.json), kept working with a note."""
    if path is not None and path.suffix.lower() == ".json":
        typer.echo("note: --config FILE.json (a model config) is deprecated; use --model-config FILE.json", err=True)
        ctx.default_map = {**(ctx.default_map or {}), "model_config": path}
        return None
    return apply_run_config(ctx, path)


def pretrain(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", is_eager=True, callback=_pretrain_config, help=CONFIG_HELP),
        out: Path = typer.Option(..., "--out", help="run directory (becomes an HF checkpoint), e.g. runs/NAME"),
        preset: str = typer.Option("tiny", help=_preset_help()),
        model_config: Optional[Path] = typer.Option(None, "--model-config", help="model config.json (transformers' DeepseekV3, DeepseekV32 or DeepseekV4 fields) instead of --preset"),
        data: Optional[list[Path]] = option(DataConfig, "paths", None, "--data", help=".txt/.jsonl/.parquet files or directories (repeat); default: the embedded pydoc corpus"),
        text_field: str = option(DataConfig, "text_field"),
        tokenizer: Optional[Path] = option(DataConfig, "tokenizer", None, "--tokenizer"),
        max_steps: Optional[int] = option(TrainConfig, "max_steps", None, default_note="1000; with --resume, the run's own"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint, with its own settings"),
        overwrite: bool = typer.Option(False, "--overwrite", help="start the run in --out over (deletes only the files a run writes), or add a run beside other files"),
        batch_size: int = option(TrainConfig, "batch_size", PRETRAIN_DEFAULTS["batch_size"]),
        seq_len: int = option(TrainConfig, "seq_len"),
        grad_accum: int = option(TrainConfig, "grad_accum"),
        lr: float = option(TrainConfig, "lr"),
        warmup_steps: int = option(TrainConfig, "warmup_steps", PRETRAIN_DEFAULTS["warmup_steps"]),
        indexer_warmup_steps: int = option(TrainConfig, "indexer_warmup_steps"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        schedule: str = option(TrainConfig, "schedule"),
        weight_decay: float = option(TrainConfig, "weight_decay"),
        optimizer: str = option(TrainConfig, "optimizer"),
        grad_clip: float = option(TrainConfig, "grad_clip"),
        precision: str = precision_option("auto"),
        compile: str = compile_option("auto"),
        router_z_loss: Optional[float] = typer.Option(None, callback=COUNT, help="router z-loss coefficient (overrides the config, >= 0)"),
        eval_every: int = option(TrainConfig, "eval_every"),
        eval_tokens: int = option(TrainConfig, "eval_tokens", PRETRAIN_DEFAULTS["eval_tokens"]),
        save_every: int = option(TrainConfig, "save_every"),
        sample_every: int = option(TrainConfig, "sample_every"),
        sample_tokens: int = option(PretrainConfig, "sample_tokens"),
        time_limit: Optional[float] = option(TrainConfig, "time_limit", None, default_note="0; with --resume, the run's own"),
        seed: int = option(TrainConfig, "seed"),
        val_fraction: float = option(DataConfig, "val_fraction"),
        threads: Optional[int] = typer.Option(None, callback=_range(0, 4096), help="torch threads (default: all cores, on --resume the run's own; 0 = adapt between all cores and one while training)"),
        nproc: int = parallel.nproc_option("batch-size stays the global micro-batch, split over data-parallel ranks"),
        ep: int = parallel.ep_option(),
        tp: int = parallel.tp_option(),
        pp: int = parallel.pp_option(),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """Pretrain a V3, V3.2 or V4 model (--preset tiny, tiny-v32, tiny-v4) with AdamW,
    warm-up + cosine/WSD: tokenizer, token arrays, MTP and balance losses (and V3.2/V4's
    indexer KL), the aux-loss-free bias update, atomic resumable checkpoints.
    metrics.jsonl logs the indexer KL, the hash layers' load and the mHC comb matrix's
    distance from doubly stochastic where the model has them. The run directory loads with
    transformers' AutoModelForCausalLM."""
    parallel.launch("pretrain", nproc, ep, tp, pp)
    from nanoseek.cli.common import load_config
    from nanoseek.parallel import ParallelConfig, launch
    from nanoseek.train.pretrain import pretrain as run_pretrain
    cfg = load_config(None if model_config else preset, model_config)
    if router_z_loss is not None:
        cfg = cfg.replace(router_z_loss_coef=router_z_loss)
    settings = PretrainConfig(
        model=cfg,
        train=pretrain_train_config(
            **({} if max_steps is None else {"max_steps": max_steps}), batch_size=batch_size,
            seq_len=seq_len, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
            indexer_warmup_steps=indexer_warmup_steps, fp4_experts_from=fp4_experts_from,
            schedule=schedule, weight_decay=weight_decay, optimizer=optimizer, grad_clip=grad_clip,
            precision=precision, compile=compile, eval_every=eval_every, eval_tokens=eval_tokens,
            save_every=save_every, sample_every=sample_every, time_limit=time_limit or 0.0, seed=seed),
        data=DataConfig(paths=data or [], text_field=text_field, val_fraction=val_fraction,
                        tokenizer=tokenizer),
        sample_tokens=sample_tokens)
    # on --resume the run's saved settings rule; only the flags given here change them
    given = {"train.max_steps": max_steps, "train.time_limit": time_limit,
             "data.paths": settings.data.paths or None,
             "data.text_field": text_field if data else None}
    if resume and launch.is_main():
        _warn_ignored(ctx, out)
    steps_before = _finished_steps(out) if resume else None
    try:
        run = run_pretrain(out, settings, resume=resume, overwrite=overwrite,
                           progress=not no_progress, threads=threads,
                           overrides={k: v for k, v in given.items() if v is not None},
                           parallel=ParallelConfig(ep=ep, tp=tp, pp=pp))
    except BaseException as e:
        _exit_on_signal(e, f"nanoseek pretrain --out {out} --resume")
        raise
    if launch.is_main():
        typer.echo(_done_line(out, run["summary"], steps_before))


def _given_flags(ctx: typer.Context) -> list[str]:
    """The parameters set on the command line, by environment or by a --config file, not
    by default."""
    return [name for name in ctx.params if name != "config" and getattr(
        ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")]


def _warn_ignored(ctx: typer.Context, out: Path) -> None:
    """One line naming each flag that --resume ignores (and the run's own value)."""
    from nanoseek.train.run.run_settings import read_settings
    ignored = [n for n in _given_flags(ctx) if n not in RESUME_FLAGS]
    if not ignored:
        return
    try:
        saved = read_settings(out)
    except (OSError, ValueError):
        saved = None
    parts = []
    for name in ignored:
        own = _saved_value(saved, name)
        parts.append(f"--{name.replace('_', '-')}" + (f" (the run's: {own})" if own is not None else ""))
    typer.echo(f"warning: --resume continues with the run's saved settings; ignoring "
               f"{', '.join(parts)}", err=True)


def _saved_value(saved, name: str):
    if saved is None:
        return None
    for section in (saved.train, saved.data, saved):
        if hasattr(section, name):
            return getattr(section, name)
    return None


def _exit_on_signal(e: BaseException, resume_command: str) -> None:
    """Interrupted (a checkpoint was saved) or Aborted (a second signal): one line on
    stderr and exit 128 + signal; anything else is left to the caller."""
    from nanoseek.parallel import launch
    from nanoseek.train.run.signals import Aborted, Interrupted
    if isinstance(e, Interrupted):
        hint = f"; continue with: {resume_command}" if e.step else ""
        if launch.is_main():  # one line, not one per rank
            typer.echo(f"{e}{hint}", err=True)
        raise typer.Exit(e.exit_code)
    if isinstance(e, Aborted):
        if launch.is_main():
            typer.echo(f"{e}: the steps since the last checkpoint are lost, the checkpoint itself "
                       f"is intact; continue with: {resume_command}", err=True)
        raise typer.Exit(e.exit_code)


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
        config: Optional[Path] = config_option(),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: ROOT/NAME, i.e. runs/speedrun, or runs/speedrun-PRESET for another --preset)"),
        name: Optional[str] = typer.Option(None, help="run name: writes ROOT/NAME/report.md (default: speedrun for --preset tiny, speedrun-PRESET for the others)"),
        root: Path = typer.Option(Path("runs"), help="parent directory of runs"),
        minutes: Optional[float] = typer.Option(None, callback=_range(0, 7 * 24 * 60, lo_open=True), help="training time budget in minutes, > 0 (default 7; with --resume, the run's own)"),
        max_steps: Optional[int] = typer.Option(None, callback=POSITIVE, help="training steps if time allows, >= 1 (default 300 in fp32, 380 in bf16, which buys them in the same time; with --resume, the run's own)"),
        threads: Optional[int] = typer.Option(None, callback=_range(0, 4096), help="torch threads (default 0 = adapt between all cores and one while training: on a crowded machine one thread can be faster; with --resume, the run's own)"),
        resume: bool = typer.Option(False, "--resume", help="continue the speedrun in runs/NAME (e.g. after Ctrl-C)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace the speedrun in runs/NAME (deletes only its own files)"),
        preset: str = typer.Option("tiny", help="tiny (DeepSeek-V3), tiny-v32 (V3.2) or tiny-v4 (V4): the same pipeline, recipe and time budget on each architecture (see `nanoseek pretrain --help`); it also picks the run directory (runs/speedrun-PRESET), so resume a V4 speedrun with --preset tiny-v4 --resume"),
        compare: Optional[Path] = typer.Option(None, "--compare", help="a finished V3 speedrun (directory, run.json or report.md) whose validation bits per byte the report sets beside this run's (default for tiny-v32/tiny-v4: ROOT/speedrun, else the newest V3 speedrun in ROOT)"),
        precision: Optional[str] = precision_option(),
        compile: Optional[str] = compile_option(),
        optimizer: Optional[str] = option(TrainConfig, "optimizer", None, default_note="adamw; with --resume, the run's own"),
        fp4_experts_from: Optional[int] = option(TrainConfig, "fp4_experts_from"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")):
    """The whole pipeline on the embedded corpus with the tiny preset: tokenizer,
    pretraining, evaluation, report (about 5 minutes on a 2-core CPU, 7 minutes of training at most).
    --preset tiny-v4 (or tiny-v32) trains DeepSeek-V4 (V3.2) in the same time budget and
    compares its validation bits per byte with the V3 speedrun's."""
    from nanoseek.recipes.speedrun import default_name
    from nanoseek.recipes.speedrun import speedrun as run_speedrun
    if out is not None:
        root, name = out.parent, out.name
    name = name or default_name(preset)
    given = precision_given(resume, precision=precision, compile=compile, optimizer=optimizer,
                            fp4_experts_from=fp4_experts_from)
    try:
        run_speedrun(name, root, minutes, max_steps, progress=not no_progress, threads=threads,
                     resume=resume, overwrite=overwrite, preset_name=preset, compare=compare,
                     **given)
    except BaseException as e:
        _exit_on_signal(e, f"nanoseek speedrun --root {root} --name {name} --resume")
        raise


def report(run_dir: Path = typer.Argument(..., help="run directory (with run.json and metrics.jsonl)")):
    """(Re)write a run's report.md and plots from its metrics, even mid-run."""
    from nanoseek.reports.run_report import write_report
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}: no run.json (not a run directory)")
    typer.echo(str(write_report(run_dir)))


def eval_(run_dir: Path = typer.Argument(..., help="run directory (checkpoint + tokenizer + data/)"),
          seq_len: Optional[int] = typer.Option(None, min=1, help="window length (default: the run's own seq_len)"),
          task: Optional[str] = typer.Option(None, "--task", help="score held-out accuracy on a task instead: arithmetic | countdown | tool_use | FILE.jsonl"),
          option: Optional[list[str]] = typer.Option(None, "--option", help="task option KEY=VALUE (repeat), e.g. digits=3"),
          num_problems: int = typer.Option(200, "--num-problems", min=1, help="held-out problems (with --task)"),
          n: Optional[int] = deprecated_option(None, "--n", "--num-problems", min=1),
          k: int = typer.Option(4, "--k", min=0, help="pass@k from sampled completions (0 = greedy only)"),
          samples: Optional[int] = typer.Option(None, "--samples", min=1, help="completions per problem for pass@k (default k)"),
          temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="sampling temperature for pass@k"),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="generation budget (default: the task's)"),
          seed: int = typer.Option(0, help="which held-out problems, and the sampling seed"),
          as_json: bool = typer.Option(False, "--json", help="print the full result as JSON")):
    """Validation loss and bits per byte of a saved checkpoint on its run's held-out split;
    with --task, held-out task accuracy (greedy) and pass@k (sampled) through the engine."""
    n = num_problems if n is None else n  # --n: the old spelling
    if task is not None:
        return _eval_task(run_dir, task, option or [], n, k, samples, temperature, max_tokens, seed, as_json)
    from nanoseek.train.eval import evaluate_run
    ev = evaluate_run(run_dir, seq_len)
    typer.echo(f"val_loss={ev['val_loss']:.4f} val_bpb={ev['val_bpb']:.4f} tokens={ev['val_tokens']}")


def _eval_task(run_dir, task, options, n, k, samples, temperature, max_tokens, seed, as_json):
    import json

    from nanoseek.cli.common import task_options
    from nanoseek.data.tasks import load_task
    from nanoseek.train.eval import evaluate_task
    ev = evaluate_task(run_dir, load_task(task, **task_options(options)), n=n, k=k,
                       temperature=temperature, seed=seed, samples=samples, max_tokens=max_tokens)
    if as_json:
        typer.echo(json.dumps(ev, indent=2))
        return
    line = f"task={ev['task']} n={ev['n']} accuracy={ev['accuracy']:.4f} format={ev['format']:.4f}"
    if k:
        line += f" pass@1={ev['pass@1']:.4f} pass@{k}={ev[f'pass@{k}']:.4f} (T={temperature})"
    typer.echo(line + f" in {ev['seconds']:.1f}s")


def peak(remeasure: bool = typer.Option(False, help="measure again (keeps the higher figure)")):
    """This machine's measured matmul peak (the denominator of MFU)."""
    from nanoseek.train.numerics.mfu import measure_peak_flops
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
