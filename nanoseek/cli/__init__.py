"""`nanoseek <command>`: one entry point. Each area registers its commands from its own
module, whose top-level imports stay light so that `--help` is instant."""

import typer

app = typer.Typer(help="nanoseek: the DeepSeek-V3 stack — model, training, engine, calculators.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.callback()
def main() -> None:
    """nanoseek: the DeepSeek-V3 stack — model, training, engine, calculators."""


def _register() -> None:
    from nanoseek import cli_model
    cli_model.register(app)
    from nanoseek import cli_train
    cli_train.register(app)
    from nanoseek import cli_engine
    cli_engine.register(app)
    from nanoseek import cli_calc
    cli_calc.register(app)


_register()
