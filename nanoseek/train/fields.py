"""Settings fields that carry their own help text and limits.

A settings dataclass (TrainConfig, DataConfig, RLConfig...) declares each field with
`setting(default, help=..., lo=..., hi=..., choices=...)`. That one declaration is where
the default, the allowed values and the help text live: `check_settings` validates a
dataclass against it (Python callers, run.toml files and flags meet the same limits), and
the CLI builds its options from it (nanoseek/cli/settings.py), so a flag's help and range
cannot drift from the field's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_META = "nanoseek"


def setting(default: Any = dataclasses.MISSING, *, help: str, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False, choices: tuple[str, ...] | None = None,
            optional: bool = False, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help and limits. `integer`: an int (not a bool); `lo`/`hi`:
    finite bounds (open with lo_open/hi_open); `choices`: the allowed strings; `optional`:
    None is allowed too."""
    meta = {_META: dict(help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open,
                        integer=integer, choices=choices, optional=optional)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def limits(cls: type, name: str) -> dict:
    """The help and limits of `cls.name` ({} for a field declared without `setting`)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return dict(f.metadata.get(_META, {}))
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def describe(meta: dict) -> str:
    """The allowed values in words: 'an integer >= 1', 'a finite number in (0, 1]'..."""
    if meta.get("choices"):
        return f"one of {' | '.join(meta['choices'])}"
    lo, hi = meta.get("lo"), meta.get("hi")
    kind = "an integer" if meta.get("integer") else "a finite number"
    if lo is not None and hi is not None and meta["lo_open"]:  # reads better than "in (0, 1]"
        return f"{kind} > {lo:g} and {'<' if meta['hi_open'] else '<='} {hi:g}"
    if lo is not None and hi is not None:
        return f"{kind} in [{lo:g}, {hi:g}{')' if meta['hi_open'] else ']'}"
    if lo is not None:
        return f"{kind} {'>' if meta['lo_open'] else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if meta['hi_open'] else '<='} {hi:g}"
    return kind if meta.get("integer") else "a finite number"


def problem(meta: dict, value: Any) -> str | None:
    """Why `value` is not allowed by `meta` ('must be ...'), or None when it is."""
    if not meta or (value is None and meta.get("optional")):
        return None
    if meta.get("choices"):
        return None if value in meta["choices"] else f"must be {describe(meta)}"
    if meta.get("lo") is None and meta.get("hi") is None and not meta.get("integer"):
        return None  # a field with help only (a path, a flag...)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if meta.get("integer") and not (number and isinstance(value, int)):
        return f"must be {describe(meta)}"
    if not number or not math.isfinite(value):
        return f"must be {describe(meta)}"
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
        return f"must be {describe(meta)}"
    if hi is not None and (value >= hi if meta["hi_open"] else value > hi):
        return f"must be {describe(meta)}"
    return None


def check_settings(obj: Any, what: str) -> None:
    """Every `setting` field of the dataclass `obj` within its limits: a ValueError
    `{what} option 'NAME': must be ..., got VALUE` for the first that is not."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        why = problem(f.metadata.get(_META, {}), value)
        if why:
            raise ValueError(f"{what} option '{f.name}': {why}, got {value!r}")
