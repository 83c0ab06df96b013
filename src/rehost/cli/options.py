"""Options that several commands share, defined once so their flags and help agree."""

from __future__ import annotations

from typing import Annotated

import typer

from rehost.cli.output import errors_as_json

Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print machine-readable JSON (a failure too: {status, error} on stdout).",
        callback=errors_as_json,
    ),
]
Fmt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="Skip detection and read as this format (e.g. raw)."),
]
