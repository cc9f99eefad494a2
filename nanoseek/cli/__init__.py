"""`nanoseek <command>`: one entry point (`[project.scripts] nanoseek = "nanoseek.cli:app"`).

One module per area — model.py, train.py, posttrain.py, rl.py, engine.py, serve.py, calc.py, agent.py —
each with its commands as
module-level functions and a `register(app)` that adds them; their top-level imports stay
light (torch is imported inside the commands), so `nanoseek --help` is instant. Errors:
common.py (one line `error: ...` and exit code 2 for a user error; `--debug` for the traceback).
"""

import typer

from nanoseek.cli import agent, calc, engine, model, posttrain, rl, serve, train
from nanoseek.cli.common import CliGroup, set_debug

app = typer.Typer(cls=CliGroup, help="nanoseek: the DeepSeek-V3 stack — model, training, engine, calculators.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", envvar="NANOSEEK_DEBUG",
                                    help="show the traceback of an error (also NANOSEEK_DEBUG=1)")) -> None:
    """nanoseek: the DeepSeek-V3 stack — model, training, engine, calculators."""
    set_debug(debug)


for area in (model, train, posttrain, rl, engine, serve, calc, agent):
    area.register(app)
