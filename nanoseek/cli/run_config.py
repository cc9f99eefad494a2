"""`--config run.toml`: a training command's options written in a file.

The file's keys are the command's option names (`max_steps` or `max-steps`, as in
`--max-steps`), with the same values the flags take; tables (`[train]`, `[data]`...) may
group them and only group them. The file's values become the command's defaults, so a flag
given on the command line overrides the file; every value meets the same checks as the flag;
a key that is not an option of the command is an error naming the key and the file. The
resolved settings are saved in the run directory (run.json) as for any run.

    # run.toml
    preset = "tiny"
    [train]
    max_steps = 200
    lr = 3e-3

TOML is read with tomllib (Python >= 3.11), or with the `tomli` package on Python 3.10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli.common import one_line

CONFIG_HELP = ("a TOML file of this command's options (keys: the option names, e.g. max_steps = 200; "
               "tables only group them); flags given on the command line override it")
# options a file cannot set: the file itself, and what is not a setting of the run
NOT_IN_FILE = {"config", "help"}


def read_toml(path: Path) -> dict:
    """The file's table; a missing file, or TOML that does not parse, is one ValueError line."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError(f"--config {path}: reading TOML on Python 3.10 needs the tomli "
                             "package (pip install tomli), or use Python >= 3.11") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({one_line(e)})") from None


def flatten(table: dict, path: Path, where: str = "") -> dict:
    """Tables only group options: {"train": {"lr": 1e-3}} -> {"lr": 1e-3}; a key given twice
    is an error."""
    out: dict = {}
    for key, value in table.items():
        items = flatten(value, path, f"{where}{key}.") if isinstance(value, dict) else {key: value}
        for k, v in items.items():
            if k in out:
                raise ValueError(f"--config {path}: {k!r} is given twice")
            out[k] = v
    return out


def file_defaults(command, table: dict, path: Path) -> dict:
    """The file's keys as the command's parameter names; an unknown key is an error."""
    params = {p.name: p for p in command.params if p.name not in NOT_IN_FILE}
    out = {}
    for key, value in flatten(table, path).items():
        name = key.replace("-", "_")
        if name not in params:
            raise ValueError(f"--config {path}: unknown key {key!r} (not an option of "
                             f"`nanoseek {command.name}`; see its --help)")
        param = params[name]
        if getattr(param, "multiple", False) and not isinstance(value, list):
            value = [value]
        out[name] = value
    return out


def apply(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """The --config callback (eager: it runs before the other options are read): the file's
    values become the defaults that the command line overrides."""
    if path is None:
        return None
    ctx.default_map = {**(ctx.default_map or {}), **file_defaults(ctx.command, read_toml(path), path)}
    return path


def config_option():
    """--config run.toml for a training command."""
    return typer.Option(None, "--config", is_eager=True, callback=apply, help=CONFIG_HELP)
