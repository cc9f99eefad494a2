"""`nanoseek <command>`: one entry point (`[project.scripts] nanoseek = "nanoseek.cli:app"`).

One module per area — model.py, train.py, posttrain.py, rl.py, engine.py, serve.py, calc.py, agent.py —
each with its commands as
module-level functions and a `register(app)` that adds them; their top-level imports stay
light (torch is imported inside the commands), so `nanoseek --help` is instant. Errors:
common.py (one line `error: ...` and exit code 2 for a user error; `--debug` for the traceback).
"""

import typer

from nanoseek.cli import agent, calc, distill, engine, model, posttrain, rl, serve, train
from nanoseek.cli.common import CliGroup, set_debug

app = typer.Typer(cls=CliGroup, help="nanoseek: the DeepSeek stack (V2, V3, V3.2, V4) — model, training, engine, calculators.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


def version() -> str:
    """The installed distribution's version (its metadata), else the source tree's
    nanoseek.__version__; reads no module that imports torch."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("nanoseek")
    except PackageNotFoundError:
        import nanoseek
        return nanoseek.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nanoseek {version()}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", envvar="NANOSEEK_DEBUG",
                                    help="show the traceback of an error (also NANOSEEK_DEBUG=1)"),
         show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                           help="print nanoseek's version and exit")) -> None:
    """nanoseek: the DeepSeek-V3 stack — model, training, engine, calculators."""
    set_debug(debug)


for area in (model, train, posttrain, rl, distill, engine, serve, calc, agent):
    area.register(app)


def _unwrap_docstrings(typer_app: typer.Typer) -> None:
    """Help from docstrings with their source line breaks removed (paragraphs kept): rich
    would otherwise print each 90-column source line as its own line in `--help`."""
    import inspect
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for group in typer_app.registered_groups:
        _unwrap_docstrings(group.typer_instance)


_unwrap_docstrings(app)
