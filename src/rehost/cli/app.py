"""The `rehost` command: a thin typer layer over the library."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rehost import __version__
from rehost.cli import agent, demo, image, importer, objectstore, receive, upload
from rehost.cli.output import report_error, setup_logging

app = typer.Typer(
    name="rehost",
    help="Move servers and disk images into a cloud or KVM fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image.app, name="image")
app.add_typer(objectstore.app, name="objectstore")
app.command(name="upload")(upload.upload)
app.command(name="import")(importer.import_)
app.command(name="receive")(receive.receive)
app.command(name="agent")(agent.agent)
app.command(name="agent-bundle")(agent.agent_bundle)
app.command(name="demo")(demo.demo)


def _version(value: bool) -> None:
    if value:
        print(f"rehost {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Errors exit 1 with `error: CODE: message` and a `hint:`; usage errors exit 2."""


def main() -> None:
    setup_logging()
    try:
        app()  # typer handles usage errors (exit 2) and --help itself
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # every failure leaves through report_error, typed
        sys.exit(report_error(e))
