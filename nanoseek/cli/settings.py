"""Flags built from the settings dataclasses: `option(TrainConfig, "lr")` is a typer option
whose help text and limits are the field's own (train/fields.py), so `--lr`'s range, a
run.toml's `lr = ...` and a Python caller's `TrainConfig(lr=...)` are checked by one rule.

The settings modules import no torch, so building options at import time keeps
`nanoseek --help` instant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from nanoseek.train.fields import describe, limits, problem

FROM_FIELD: Any = object()  # option()'s default: the dataclass field's own default


def field_default(cls: type, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def option_help(cls: type, name: str, help: str | None = None, default_note: str | None = None) -> str:
    """The field's help (or `help`), its allowed values, and a default note such as
    '(default: 8)' for options whose None means the stage's own default (rich would
    read square brackets as markup)."""
    meta = limits(cls, name)
    text = help or meta["help"]
    if meta.get("choices"):
        text += f": {' | '.join(meta['choices'])}"
    elif meta.get("integer") or meta.get("lo") is not None or meta.get("hi") is not None:
        text += f" ({describe(meta)})"
    return text + (f" (default: {default_note})" if default_note is not None else "")


def checker(cls: type, name: str):
    """A typer callback: the value (if given) is allowed by the field, else one line naming
    the flag, the limit and the value."""
    meta = limits(cls, name)

    def check(ctx: typer.Context, param: typer.CallbackParam, value):
        if value is not None and not isinstance(value, (list, tuple)):
            why = problem(meta, value)
            if why:
                raise typer.BadParameter(f"{why}, got {value}{from_file(ctx, param)}")
        return value
    return check


def from_file(ctx: typer.Context, param) -> str:
    """' (from --config FILE)' when the value came from a run.toml, so the error says where
    to fix it."""
    source = getattr(ctx.get_parameter_source(param.name), "name", "")
    return f" (from --config {ctx.params.get('config')})" if source == "DEFAULT_MAP" else ""


def option(cls: type, name: str, default: Any = FROM_FIELD, *decls: str, help: str | None = None,
           default_note: str | None = None, **kw):
    """A typer option for the field `cls.name` (default: the field's default)."""
    if default is FROM_FIELD:
        default = field_default(cls, name)
    return typer.Option(default, *decls, help=option_help(cls, name, help, default_note),
                        callback=checker(cls, name), **kw)
