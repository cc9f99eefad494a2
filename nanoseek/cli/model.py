"""Model commands: `nanoseek info`."""

from __future__ import annotations

from typing import Optional

import typer

from nanoseek.cli.common import print_tables


def info(path: Optional[str] = typer.Argument(None, help="checkpoint directory"),
         preset: Optional[str] = typer.Option(None, help="preset name (tiny, deepseek-v2-lite, deepseek-v2, deepseek-v3)")):
    """Show a model's configuration and parameter counts (from the config: nothing is built)."""
    from rich.table import Table

    from nanoseek.calc.params import count_params
    from nanoseek.config import preset as get_preset
    if (path is None) == (preset is None):
        raise typer.BadParameter("give a checkpoint directory or --preset, not both")
    if path:
        from pathlib import Path

        from nanoseek.checkpoint.hf import read_config
        cfg = read_config(Path(path))
    else:
        cfg = get_preset(preset)
    counts = count_params(cfg)
    t = Table(title=path or preset)
    t.add_column("field")
    t.add_column("value")
    for k, v in cfg.to_dict().items():
        t.add_row(k, str(v))
    t.add_row("parameters (main model)", f"{counts.main_total:,}")
    t.add_row("activated per token (main model)", f"{counts.main_activated:,}")
    t.add_row("MTP modules", f"{counts.mtp:,}")
    print_tables(t)


def register(app: typer.Typer) -> None:
    app.command()(info)
