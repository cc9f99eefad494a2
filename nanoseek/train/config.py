"""Settings of a training run: the loop's `TrainConfig`, and the save/rebuild of a stage's.

Every stage describes its run with one dataclass that nests the loop's settings, e.g.
`PretrainConfig(model, train: TrainConfig, data: DataConfig, ...)` (SFT, DPO and GRPO the
same way), rather than with ever more keyword arguments. `settings_to_dict` writes it to
run.json and `settings_from_dict` rebuilds it on resume, so what a resumed run trains
with is exactly what the run was started with.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from nanoseek.train.fields import check_settings, setting
from nanoseek.train.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "on")
OPTIMIZERS = ("adamw", "muon")  # train/numerics/optim.py


@dataclass
class TrainConfig:
    """The loop's settings. Each field's help and limits live in its `setting(...)`: the
    CLI's flags and run.toml files are built from and checked against them (fields.py)."""
    max_steps: int = setting(1000, help="optimizer steps", lo=1, integer=True)
    batch_size: int = setting(16, help="sequences per micro-batch", lo=1, integer=True)
    seq_len: int = setting(256, help="tokens per sequence (at most the model's max_position_embeddings)",
                           lo=1, integer=True)
    grad_accum: int = setting(1, help="micro-batches per optimizer step", lo=1, integer=True)
    lr: float = setting(3e-3, help="peak learning rate", lo=0, hi=1, lo_open=True)
    min_lr_ratio: float = setting(0.1, help="final learning rate as a fraction of the peak", lo=0, hi=1)
    warmup_steps: int = setting(50, help="linear warm-up steps", lo=0, integer=True)
    # V3.2 §2.1.1 (model/dsa.py): the first steps train the lightning indexers alone
    indexer_warmup_steps: int = setting(
        0, help="V3.2/V4: first steps of the indexers' dense warm-up (attention dense, only the "
        "indexers learn their KL, the rest frozen), then sparse training (0 = none)", lo=0, integer=True)
    # V4's FP4 quantisation-aware training (quant/fp4_qat.py): from this step on the routed
    # experts' weights are fake-quantised to FP4 in every forward, gradients straight through
    fp4_experts_from: int | None = setting(
        None, help="step from which the routed experts train fake-quantised to FP4 (E2M1, a UE8M0 "
        "scale per 32 inputs; straight-through gradients to fp32 masters); unset = never",
        lo=0, integer=True, optional=True)
    schedule: str = setting("cosine", help="learning-rate schedule", choices=SCHEDULES)
    decay_frac: float = setting(0.2, help="WSD: fraction of the steps spent decaying", lo=0, hi=1)
    weight_decay: float = setting(0.1, help="decoupled weight decay, AdamW's and Muon's (matrices only)", lo=0)
    beta1: float = setting(0.9, help="AdamW beta1", lo=0, hi=1, hi_open=True)
    beta2: float = setting(0.95, help="AdamW beta2", lo=0, hi=1, hi_open=True)
    # V4 report §2.4: Muon (hybrid Newton-Schulz, update RMS 0.18) on the hidden matrices,
    # AdamW on embeddings, heads, norms and biases, one lr and schedule (train/numerics/optim.py)
    optimizer: str = setting("adamw", help="optimizer (muon: DeepSeek-V4's Muon on the hidden matrices, "
                             "AdamW on embeddings, heads, norms and biases)", choices=OPTIMIZERS)
    grad_clip: float = setting(1.0, help="gradient-norm clipping (0 = off)", lo=0)
    # auto: bf16 autocast where bf16 is fast (train/numerics/precision.py), else fp32
    precision: str = setting("auto", help="compute precision", choices=PRECISIONS)
    # torch.compile of the blocks (train/numerics/compile.py)
    compile: str = setting("auto", help="torch.compile of the blocks", choices=COMPILE_MODES)
    eval_every: int = setting(100, help="steps between evaluations (0 = at the end only)", lo=0, integer=True)
    eval_tokens: int = setting(65536, help="validation tokens per evaluation (0 = all)", lo=0, integer=True)
    save_every: int = setting(100, help="steps between checkpoints (0 = at the end only; Ctrl-C saves too)",
                              lo=0, integer=True)
    sample_every: int = setting(0, help="steps between samples (0 = at the end only)", lo=0, integer=True)
    log_every: int = setting(1, help="steps per metrics line (its values are the means over those steps)",
                             lo=1, integer=True)
    seed: int = setting(1337, help="random seed", lo=0, integer=True)
    # the schedule then follows max(step / max_steps, elapsed / time_limit), so it is not
    # bit-reproducible
    time_limit: float = setting(0.0, help="stop after this many seconds of training (0 = none)", lo=0)
    clock: str = setting(
        "wall", help="what time_limit and the logged `elapsed` count: wall seconds, or cpu: this "
        "process's CPU seconds, every thread's added (equal budgets on a shared machine; tok_s "
        "stays per wall second)",
        choices=("wall", "cpu"))

    def validate(self) -> None:
        """Every field in its range (no value silently stands for another): a ValueError
        naming the field, the limit and the value."""
        check_settings(self, "training")


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
