"""The ``arkfed`` command line: a thin typer layer over the library.

Each area registers its commands from its own module (``arkfed/cli/<area>.py`` exposes
``register(app)``). Heavy imports happen inside the commands so ``arkfed --help`` stays fast.
User errors (:class:`ArkfedError`) are printed as one red line and exit with status 2. The top layer:
it may import everything, and nothing in arkfed imports it.
"""

from __future__ import annotations

import importlib
import sys

import typer

from arkfed.errors import ArkfedError

app = typer.Typer(
    name="arkfed",
    help="Train and reuse chest X-ray foundation models with Ark, across sites whose images never leave them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps ``arkfed`` a command group whatever the number of registered commands."""


COMMAND_MODULES = ("data", "train", "federation", "evaluation", "benchmark", "release", "audit", "console")

for _name in COMMAND_MODULES:
    importlib.import_module(f"arkfed.cli.{_name}").register(app)


def main() -> None:
    try:
        app(standalone_mode=True)
    except ArkfedError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
