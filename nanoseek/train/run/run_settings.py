"""A pretraining run's settings, and how run.json keeps them.

One dataclass (`PretrainConfig`) nests the loop's `TrainConfig` with the model and the data;
run.json stores it whole, and a resumed run (or `nanoseek eval`, or the report) reads it
back from there, so a run is always continued and judged with the settings it started with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import ModelConfig
from nanoseek.train.config import TrainConfig, settings_from_dict
from nanoseek.train.fields import check_settings, setting

DEFAULT_SOURCE = "<pydoc_data.topics>"


@dataclass
class DataConfig:
    paths: list[str] = setting(help=".txt/.jsonl/.parquet files or directories; [] = the embedded "
                               "pydoc corpus", default_factory=list)
    text_field: str = setting("text", help="column holding the text in .jsonl/.parquet files")
    val_fraction: float = setting(0.1, help="share of documents held out for validation (a validation "
                                  "split is needed and so is a training one)",
                                  lo=0, hi=1, lo_open=True, hi_open=True)
    tokenizer: str | None = setting(None, help="a trained tokenizer's directory (default: train one on "
                                    "the data)")

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths or []]
        self.tokenizer = str(self.tokenizer) if self.tokenizer else None

    def validate(self) -> None:
        check_settings(self, "data")


# `nanoseek pretrain`'s loop settings where they differ from TrainConfig's (a smaller batch and
# warm-up for the tiny preset on a CPU; every validation token). A Python caller's
# PretrainConfig(model) keeps TrainConfig's own defaults.
PRETRAIN_DEFAULTS = dict(max_steps=1000, batch_size=8, warmup_steps=30, eval_tokens=0)


def pretrain_train_config(**kw) -> TrainConfig:
    return TrainConfig(**{**PRETRAIN_DEFAULTS, **kw})


@dataclass
class PretrainConfig:
    """Everything a pretraining run is; the machine-side knobs (threads, progress bar) are
    arguments of `pretrain` instead, since a resumed run may run on another machine."""
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample_tokens: int = setting(48, help="tokens per sample (0 = no samples)", lo=0, integer=True)

    def validate(self) -> None:
        """Every setting in its range, before anything is written (see TrainConfig.validate)."""
        self.train.validate()
        self.data.validate()
        ctx = self.model.max_position_embeddings
        if self.train.seq_len > ctx:
            raise ValueError(f"training option 'seq_len': {self.train.seq_len} exceeds the model's "
                             f"context (max_position_embeddings={ctx})")
        if not (isinstance(self.sample_tokens, int) and 0 <= self.sample_tokens < ctx):
            raise ValueError(f"option 'sample_tokens': must be an integer in [0, {ctx}) (the "
                             f"model's context), got {self.sample_tokens!r}")


# What a resumed run may change: the length of the run (extend or shorten it).
RESUME_OVERRIDES = ("train.max_steps", "train.time_limit")


def settings_of(run: dict) -> dict:
    """run.json's settings (a PretrainConfig as a dict), also from runs written before the
    settings were saved whole (then: model_config, train_config, data_paths, text_field)."""
    if "settings" in run:
        return run["settings"]
    data = {"paths": [p for p in run.get("data_paths", []) if p != DEFAULT_SOURCE],
            "text_field": run.get("text_field", "text")}
    if "val_fraction" in run.get("data", {}):
        data["val_fraction"] = run["data"]["val_fraction"]
    return {"model": run["model_config"], "train": run["train_config"], "data": data}


def read_settings(run_dir: str | Path) -> PretrainConfig | None:
    """The PretrainConfig a run was started with (None: the run wrote no run.json yet)."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return None
    return settings_from_dict(PretrainConfig, settings_of(json.loads(path.read_text())), str(path))


def with_overrides(config: PretrainConfig, overrides: dict) -> PretrainConfig:
    """`config` with dotted fields replaced: {"train.max_steps": 2000, "data.paths": [...]}."""
    for key, value in overrides.items():
        *parents, name = key.split(".")
        if not parents:
            config = dataclasses.replace(config, **{name: value})
            continue
        section = getattr(config, parents[0])
        config = dataclasses.replace(config, **{parents[0]: dataclasses.replace(section, **{name: value})})
    return config
