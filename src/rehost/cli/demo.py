"""`rehost demo`: the quick start's first command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rehost.cli.output import out_console, state_dir


def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the demo's files here instead of a temporary dir.")
    ] = None,
) -> None:
    """Run an offline migration end to end on the embedded default.

    Starts a local object store (unless one runs), packs a sample disk into qcow2,
    uploads it, imports it onto a file-backed disk and verifies it.
    """
    from rehost.demo import run_demo  # boto3 is slow to import

    result = run_demo(state_dir(), workdir, say=out_console.print)
    out_console.print(
        f"demo passed: a {result.disk_size >> 20} MiB disk went through object storage as a "
        f"{result.packed_size / (1 << 20):.1f} MiB qcow2 and landed byte-exact"
    )
