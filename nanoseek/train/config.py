"""Settings of a training run: the loop's `TrainConfig`, and the save/rebuild of a stage's.

Every stage describes its run with one dataclass that nests the loop's settings, e.g.
`PretrainConfig(model, train: TrainConfig, data: DataConfig, ...)` (SFT, DPO and GRPO the
same way), rather than with ever more keyword arguments. `settings_to_dict` writes it to
run.json and `settings_from_dict` rebuilds it on resume, so what a resumed run trains
with is exactly what the run was started with.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from nanoseek.train.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "on")


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
    precision: str = "auto"  # auto: bf16 autocast where bf16 is fast (train/numerics/precision.py), else fp32
    compile: str = "auto"  # torch.compile of the blocks: auto | off | on (train/numerics/compile.py)
    eval_every: int = 100  # 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (0 = all)
    save_every: int = 100  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end
    log_every: int = 1  # steps per metrics line (its values are the means over those steps)
    seed: int = 1337
    time_limit: float = 0.0  # seconds of training, then stop (0 = none); the schedule
    # then follows max(step / max_steps, elapsed / time_limit), so it is not bit-reproducible

    def validate(self) -> None:
        """Every field in its range (no value silently stands for another): a ValueError
        naming the field, the limit and the value."""
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"training option '{name}': {msg}, got {getattr(self, name)!r}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "must be an integer >= 1")
        for name in ("warmup_steps", "eval_every", "eval_tokens", "save_every", "sample_every", "seed"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(_finite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0")
        for name in ("min_lr_ratio", "decay_frac"):
            need(_finite(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name, "must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            need(_finite(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, "must lie in [0, 1)")
        for name in ("weight_decay", "grad_clip", "time_limit"):
            need(_finite(getattr(self, name)) and getattr(self, name) >= 0, name,
                 "must be a finite number >= 0 (0 = off)")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.compile in COMPILE_MODES, "compile", f"must be one of {COMPILE_MODES}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def settings_to_dict(settings: Any) -> dict:
    """A stage's settings as JSON-ready values: nested dataclasses as dicts, a field whose
    type has `to_dict` (ModelConfig: its Hugging Face config.json layout) through it."""
    out = {}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        elif dataclasses.is_dataclass(v):
            v = settings_to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def settings_from_dict(cls: type, d: dict, source: str = "settings") -> Any:
    """Rebuild `cls` from `settings_to_dict`'s output. A field missing from `d` (saved before
    the field existed) takes its default; a field `cls` does not know is an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}")
    kwargs = {}
    for name, v in d.items():
        kind = hints[name]
        if hasattr(kind, "from_dict"):
            v = kind.from_dict(v, source=f"{source}: {name}")
        elif dataclasses.is_dataclass(kind):
            v = settings_from_dict(kind, v, f"{source}: {name}")
        kwargs[name] = v
    return cls(**kwargs)
