"""`rehost demo`: the quick start's first command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rehost.cli.output import out_console
from rehost.demo import run_demo


def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the demo's files here instead of a temporary dir.")
    ] = None,
) -> None:
    """Run the image engine end to end on a sample disk: pack, inspect, check, convert, verify."""
    result = run_demo(workdir, say=out_console.print)
    out_console.print(
        f"demo passed: {result.disk_size >> 20} MiB disk, packed to "
        f"{result.packed_size >> 10} KiB, landed byte-exact"
    )
