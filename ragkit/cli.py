"""The ``ragkit`` command line. Each command parses its arguments and calls the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ragkit",
    help="Offline retrieval-augmented generation over local, quantized LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Entry point of the ``ragkit`` console script."""
    app()


if __name__ == "__main__":
    main()
