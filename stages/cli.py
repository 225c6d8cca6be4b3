"""The `mimic` command line: one sub-command per stage, each a thin recipe in its own module."""

from __future__ import annotations

import logging
import sys

import typer

from pipeline.errors import MimicError
from stages import score

app = typer.Typer(
    help="MimIC: replace in-context demonstrations with learned attention shifts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(score.app, name="score")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Entry point of the console script: a MimicError becomes one line on stderr and exit code 2."""
    try:
        app()
    except MimicError as err:
        typer.echo(f"mimic: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("mimic: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
