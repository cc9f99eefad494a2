"""`python -m nanoseek ...` = `nanoseek ...`."""

from nanoseek.cli import app

app(prog_name="nanoseek")
