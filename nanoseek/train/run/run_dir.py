"""Whose directory is this? A run directory is nanoseek's only when its run.json says so.

Every run writes run.json first, before any other file, with the key "nanoseek" naming the
command that made it ("pretrain", "speedrun"); run.json is written atomically, so a
directory whose run.json lacks the key (or does not parse) was not made by nanoseek. Runs
saved before the key existed are recognised by the settings their run.json holds.

The rules that follow (`check_run_dir`): an empty or missing directory is a new run; a
nanoseek run is continued (`--resume`) or started over (`--overwrite`, which deletes only
the files a run writes: `OWN_FILES`, never anything else in the directory; a run that
never trained a step, e.g. one that failed on its data, is started over without asking:
it holds nothing that cannot be made again); any other
non-empty directory is refused, naming what is in it. With `--overwrite` a run may be
placed beside foreign files, but only when none of them has the name of a file the run
writes. Every check here only reads: a refused command changes nothing on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MARKER = "nanoseek"  # run.json key: the command that made the run
LOCK_FILE = ".nanoseek.lock"
OWN_FILES = ("run.json", "config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "train_state.pt", "metrics.jsonl", "report.md", "loss.png",
             "expert_load.png", "lr.png", "checkpoint")  # checkpoint/: a multi-process run's shards
OWN_PATTERNS = ("model-*-of-*.safetensors", ".*.tmp", ".tokenizer.*", ".checkpoint.*")
DATA_DIR, DATA_FILES = "data", ("train.bin", "val.bin", "meta.json", ".train.bin.*.tmp",
                                ".val.bin.*.tmp", ".meta.json.*.tmp")


class RunError(ValueError, RuntimeError):
    """The run directory or the inputs do not allow this run. A ValueError too, so that the
    CLI reports it as a user error (one line) from any module that raises it."""


def read_run_json(out: Path) -> dict | None:
    try:
        run = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def run_kind(out: str | Path) -> str | None:
    """The command that made the run in `out` ("pretrain", "speedrun"), None if not a run."""
    run = read_run_json(Path(out))
    if run is None:
        return None
    if isinstance(run.get(MARKER), str):
        return run[MARKER]
    if "settings" in run or "train_config" in run:  # written before the marker existed
        extra = run.get("report_extra", {})
        return "speedrun" if any("speedrun" in k for k in extra) else "pretrain"
    return None


def entries(out: Path) -> list[str]:
    """What the directory holds (its lock file aside), sorted."""
    if not out.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != LOCK_FILE)


def listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def trained_steps(out: Path) -> int:
    """The last step the run logged or saved (0: it never trained a step)."""
    from nanoseek.train.run.metrics import read_metrics

    steps = [r.get("step", 0) for r in read_metrics(out) if r.get("kind") == "train"]
    saved = (out / "train_state.pt").exists() or (out / "checkpoint").is_dir()
    return max(steps, default=1 if saved else 0)


def progress_of(out: Path) -> str:
    """'finished at step N' / 'stopped at step N' / 'no step trained', for messages."""
    from nanoseek.train.run.metrics import read_metrics

    run = read_run_json(out) or {}
    if isinstance(run.get("summary"), dict) and "steps" in run["summary"]:
        return f"finished at step {run['summary']['steps']}"
    steps = [r.get("step", 0) for r in read_metrics(out) if r.get("kind") == "train"]
    return f"stopped at step {max(steps)}" if steps else "no step trained"


def check_run_dir(out: Path, resume: bool, overwrite: bool, flag: str = "--out") -> str:
    """'new', 'resume' or 'replace' (an existing run to delete and start over); raises
    RunError, naming what is there, when the directory may not be used. Only reads."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out}: is a file, not a directory")
    kind, names = run_kind(out), entries(out)
    if kind is not None:
        if resume:
            return "resume"
        if overwrite or not trained_steps(out):  # a run that never trained saved nothing
            return "replace"
        raise RunError(f"{out} already holds a nanoseek {kind} run ({progress_of(out)}); pass "
                       "--resume to continue it, --overwrite to start over (deletes only the "
                       f"run's own files), or choose another {flag}")
    if not names:
        return "new"
    if resume:
        raise RunError(f"{out} holds no nanoseek run to resume (it holds {listing(names)})")
    if not overwrite:
        raise RunError(f"{out} is not empty and is not a nanoseek run (it holds {listing(names)}); "
                       f"choose another {flag}, or pass --overwrite to add a run beside these files")
    clash = [n for n in names if _is_own(out, n.rstrip("/"))]
    if clash:
        raise RunError(f"{out} is not a nanoseek run and holds {listing(clash)}, which a run "
                       "would overwrite; nanoseek never replaces files it did not write: move "
                       f"them or choose another {flag}")
    return "new"


def _is_own(out: Path, name: str) -> bool:
    """A name a run writes (so a foreign file of that name would be overwritten)."""
    if name == DATA_DIR:
        return any((out / DATA_DIR / f).exists() for f in DATA_FILES[:3])
    return name in OWN_FILES or any(Path(name).match(p) for p in OWN_PATTERNS)


def remove_own_files(out: Path) -> list[str]:
    """Delete the files a run writes (and data/ if that leaves it empty); everything else
    in `out` stays. Returns what was deleted."""
    out, gone = Path(out), []
    for p in sorted(out.iterdir()):
        if p.name != LOCK_FILE and p.name != DATA_DIR and _is_own(out, p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            gone.append(p.name)
    data = out / DATA_DIR
    if data.is_dir():
        for pattern in DATA_FILES:
            for f in data.glob(pattern):
                f.unlink()
                gone.append(f"{DATA_DIR}/{f.name}")
        if not any(data.iterdir()):
            data.rmdir()
    return gone
