"""Model commands: `nanoseek info`."""

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def info(path: str = typer.Argument(None, help="checkpoint directory"),
             preset: str = typer.Option(None, help="preset name (tiny, deepseek-v2-lite, deepseek-v2, deepseek-v3)")):
        """Show a model's configuration and parameter count (builds presets on the meta device)."""
        import torch
        from rich.console import Console
        from rich.table import Table

        from nanoseek.config import preset as get_preset
        from nanoseek.model import CausalLM
        if (path is None) == (preset is None):
            raise typer.BadParameter("give a checkpoint directory or --preset, not both")
        if path:
            from nanoseek.checkpoint import read_config
            from pathlib import Path
            cfg = read_config(Path(path))
        else:
            cfg = get_preset(preset)
        with torch.device("meta"):
            model = CausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        t = Table(title=path or preset)
        t.add_column("field"); t.add_column("value")
        for k, v in cfg.to_dict().items():
            t.add_row(k, str(v))
        t.add_row("parameters", f"{n:,}")
        Console().print(t)
