"""The speedrun: the whole pipeline on the embedded corpus with the `tiny` preset, on a
CPU, in minutes: tokenizer -> pretraining -> evaluation of the saved checkpoint -> report.

Training runs for `max_steps` or `minutes`, whichever ends first (the learning-rate
schedule follows whichever is further along, so a slow or shared machine still gets a
fully decayed run). `make speedrun` follows it with the RL stages (speedrun_rl.py: SFT,
GRPO, held-out evaluation) from its checkpoint.

`preset_name="tiny-v32"` or `"tiny-v4"` runs the same pipeline on DeepSeek-V3.2's or V4's
architecture with the same recipe and the same time budget, so the two runs differ in the
model alone; the report then sets its validation bits per byte beside the V3 speedrun's
(`compare`, or the V3 speedrun found beside it: `baseline_for`). Bits per byte do not depend
on the tokenizer, and with the same corpus, seed and val_fraction the validation bytes are
the same ones; the report says so, or says where they differ.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from nanoseek.config import ModelConfig, preset
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

# The presets a speedrun trains: the CPU-sized ones (a published shape would not fit)
SPEEDRUN_PRESETS = ("tiny", "tiny-v32", "tiny-v4")
BASELINE_NAME = "speedrun"  # where the default (V3) speedrun lives under --root


def default_name(preset_name: str) -> str:
    """runs/speedrun for the default preset, runs/speedrun-PRESET for the others (so a V4
    speedrun does not replace the V3 one it is compared with)."""
    return BASELINE_NAME if preset_name == "tiny" else f"{BASELINE_NAME}-{preset_name}"


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
             preset_name: str = "tiny", compare: str | Path | None = None,
             **train_overrides) -> Path:
    """Run every stage; returns the path of report.md. minutes / max_steps / threads: None
    = 7 / 300 (380 in bf16: SPEEDRUN_STEPS) / 0 (adaptive) for a new speedrun, the run's
    own on resume. preset_name: one of SPEEDRUN_PRESETS (on resume the run's own model
    rules). compare: a V3 speedrun (its directory, run.json or report.md) to set the
    validation bits per byte beside; None = the one in ROOT/speedrun, for a non-V3 preset."""
    from nanoseek.train.run.run_lock import check_unlocked, run_lock

    t_start = time.perf_counter()
    out = Path(root) / name
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"speedrun option 'minutes': must be a finite number > 0, got {minutes!r}")
    if preset_name not in SPEEDRUN_PRESETS:
        raise ValueError(f"speedrun option 'preset': {preset_name!r} is not a speedrun preset; "
                         f"choose one of {', '.join(SPEEDRUN_PRESETS)} (the others are too big "
                         "for minutes on a CPU: use `nanoseek pretrain --preset`)")
    if compare is not None:  # before minutes of training, not after them
        check_compare(out, compare)
    check_unlocked(out)
    check_speedrun_dir(out, resume, overwrite)
    with run_lock(out):  # held through pretraining, evaluation and the report
        check_speedrun_dir(out, resume, overwrite)
        return _speedrun(out, minutes, max_steps, progress, log, threads, resume, overwrite,
                         train_overrides, t_start, preset_name, compare)


def _speedrun(out: Path, minutes, max_steps, progress, log, threads, resume, overwrite,
              train_overrides, t_start, preset_name="tiny", compare=None) -> Path:
    from nanoseek.reports.run_report import write_report
    from nanoseek.train.eval import evaluate_checkpoint
    from nanoseek.train.pretrain import PretrainConfig, pretrain, write_run

    from nanoseek.train.run.run_settings import read_settings
    saved = read_settings(out) if resume else None
    if saved is not None:
        preset_name = preset_of(saved.model)
    cfg = preset(preset_name, bias_update_speed=SPEEDRUN_BIAS_SPEED) if saved is None else saved.model
    if threads is None and not resume:
        threads = 0
    given = {"train.max_steps": max_steps, "train.time_limit": None if minutes is None else minutes * 60}
    steps, precision = default_steps(train_overrides.get("precision", "auto"), cfg.hidden_size)
    minutes, max_steps = 7.0 if minutes is None else minutes, steps if max_steps is None else max_steps
    tcfg = TrainConfig(**{**SPEEDRUN_TRAIN, "max_steps": max_steps, "time_limit": minutes * 60,
                          **train_overrides})
    log(f"[1/3] tokenizer + pretraining: {preset_name} preset, {precision}, up to {max_steps} steps or {minutes:g} min"
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
    arch = ModelConfig.from_dict(run["settings"]["model"]).arch
    run["speedrun"] = {"preset": preset_name, "arch": arch, "val_loss": ev["val_loss"],
                       "val_bpb": ev["val_bpb"], "wall_s": total}
    if compare is not None or arch != "v3":
        run["comparison"] = comparison(out, run, compare)
        _log_comparison(run["comparison"], log)
    write_run(out, run)  # so that `nanoseek report` re-makes the same card later
    path = write_report(out, title="nanoseek speedrun")
    log(f"report: {path}  ({total / 60:.1f} min in all)")
    return path


# ------------------------------------------------------------------ the V3 comparison
def preset_of(cfg: ModelConfig) -> str:
    """The speedrun preset a model config is (a resumed run's model is its saved one,
    whatever --preset says), or its arch when it is none of them."""
    for name in SPEEDRUN_PRESETS:
        if preset(name, bias_update_speed=SPEEDRUN_BIAS_SPEED) == cfg:
            return name
    return f"custom {cfg.arch}"


def baseline_for(out: Path, compare: str | Path | None) -> tuple[Path | None, list[str]]:
    """The V3 speedrun to compare with: `compare` (a run directory, or its run.json or
    report.md), else ROOT/speedrun beside `out`, else the newest other V3 speedrun in
    ROOT. Returns (its directory or None, the places looked at)."""
    if compare is not None:
        path = Path(compare)
        run_dir = path.parent if path.suffix in (".json", ".md") else path
        if not (run_dir / "run.json").exists():
            raise FileNotFoundError(f"speedrun option 'compare': {compare} holds no run.json "
                                    "(give a speedrun's directory, run.json or report.md)")
        return run_dir, [str(run_dir)]
    root = out.parent
    first = root / BASELINE_NAME
    looked = [str(first)]
    if first != out and _is_v3_speedrun(first):
        return first, looked
    others = sorted((d for d in root.iterdir() if d not in (out, first) and _is_v3_speedrun(d)),
                    key=lambda d: (d / "run.json").stat().st_mtime, reverse=True) if root.is_dir() else []
    looked.append(f"{root}/*")
    return (others[0] if others else None), looked


def check_compare(out: Path, compare: str | Path) -> None:
    """--compare must name a finished V3 speedrun other than this run: refused up front."""
    run_dir, _ = baseline_for(out, compare)
    if run_dir.resolve() == out.resolve():
        raise ValueError(f"speedrun option 'compare': {compare} is this run itself; give the V3 "
                         "speedrun to compare with")
    if not _is_v3_speedrun(run_dir):
        raise ValueError(f"speedrun option 'compare': {compare} is not a finished V3 (tiny) speedrun")


def _is_v3_speedrun(run_dir: Path) -> bool:
    run = _read_run(run_dir)
    from nanoseek.train.run.run_dir import MARKER
    return (run is not None and run.get(MARKER) == "speedrun" and "summary" in run
            and run_arch(run) == "v3")


def _read_run(run_dir: Path) -> dict | None:
    import json
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def run_arch(run: dict) -> str:
    from nanoseek.train.run.run_settings import settings_of
    return ModelConfig.from_dict(settings_of(run)["model"]).arch


def speedrun_bpb(run_dir: Path, run: dict) -> float | None:
    """A finished speedrun's validation bits per byte of the reloaded checkpoint: run.json's
    "speedrun" record, or (runs written before it) the report row, or the last evaluation."""
    if (run.get("speedrun") or {}).get("val_bpb") is not None:
        return float(run["speedrun"]["val_bpb"])
    for key, value in (run.get("report_extra") or {}).items():
        if key.startswith("reloaded checkpoint") and "/" in str(value):
            return float(str(value).split("/")[1])
    from nanoseek.train.run.metrics import read_metrics
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval" and "val_bpb" in r]
    return evals[-1]["val_bpb"] if evals else None


def comparison(out: Path, run: dict, compare: str | Path | None) -> dict:
    """What the report sets beside this run: the baseline's validation bits per byte, its
    training steps, tokens and wall time, and whether both scored the same validation bytes."""
    base_dir, looked = baseline_for(out, compare)
    mine = {"preset": run["speedrun"]["preset"], "val_bpb": run["speedrun"]["val_bpb"],
            "steps": run["summary"]["steps"], "tokens": run["summary"]["tokens_seen"],
            "train_s": run["summary"]["elapsed"], "wall_s": run["speedrun"]["wall_s"]}
    if base_dir is None:
        return {"this": mine, "baseline": None, "looked_in": looked}
    base = _read_run(base_dir) or {}
    summary = base.get("summary") or {}
    wall = (base.get("speedrun") or {}).get("wall_s")
    if wall is None:
        wall = (base.get("report_extra") or {}).get("speedrun wall time, all stages (s)")
    same = {k: base.get("data", {}).get(k) == run["data"].get(k) for k in ("val_docs", "val_bytes", "val_tokens")}
    return {"this": mine, "looked_in": looked, "baseline": {
        "dir": str(base_dir), "preset": (base.get("speedrun") or {}).get("preset", "tiny"),
        "arch": run_arch(base) if base else None, "val_bpb": speedrun_bpb(base_dir, base),
        "steps": summary.get("steps"), "tokens": summary.get("tokens_seen"),
        "train_s": summary.get("elapsed"), "wall_s": None if wall is None else float(wall),
        "same_validation_bytes": all(same.values()) and run["data"].get("val_bytes") is not None}}


def _log_comparison(c: dict, log) -> None:
    b = c["baseline"]
    if b is None:
        log(f"      no V3 speedrun to compare with (looked in {', '.join(c['looked_in'])}): "
            "run `nanoseek speedrun` beside it, or pass --compare RUN_DIR")
    elif b["val_bpb"] is None:
        log(f"      {b['dir']} holds no validation bits per byte to compare with")
    else:
        d = c["this"]["val_bpb"] - b["val_bpb"]
        log(f"      against {b['dir']} ({b['preset']}): {c['this']['val_bpb']:.4f} vs "
            f"{b['val_bpb']:.4f} bits/byte ({d:+.4f})")
