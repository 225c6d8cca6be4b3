"""`mimic score`: rescore a predictions file with the official metrics (placeholder until it lands)."""

import typer

app = typer.Typer(help="Score a predictions file with the official metrics.", no_args_is_help=True)
