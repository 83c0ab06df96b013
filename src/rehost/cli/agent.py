"""`rehost agent` and `rehost agent-bundle`: the source side of an online migration.

`rehost agent` is the very code the bundle runs (rehost.online.agent.main), so a test of one
is a test of the other; `agent-bundle` writes that code as a single file to copy over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rehost.cli.output import human_bytes, out_console
from rehost.online.bundle import build_bundle


def agent(
    config: Annotated[Path, typer.Option("--config", help="The agent's JSON config file.")],
    check: Annotated[
        bool, typer.Option("--check", help="Run every precheck, change nothing, and exit.")
    ] = False,
    stage: Annotated[
        str | None,
        typer.Option(
            "--stage",
            help="prepare, transfer (repeatable: incremental), finalize, or all.",
        ),
    ] = None,
    source_root: Annotated[
        Path, typer.Option("--source-root", help="Root of the system to migrate.")
    ] = Path("/"),
) -> None:
    """Migrate this server to a destination running `rehost receive` (logs and state beside the config)."""
    from rehost.online.agent.main import main

    argv = ["--config", str(config), "--source-root", str(source_root)]
    if check:
        argv.append("--check")
    if stage is not None:
        argv += ["--stage", stage]
    raise typer.Exit(main(argv))


def agent_bundle(
    out: Annotated[Path, typer.Argument(help="Output file, e.g. rehost-agent.pyz.")],
) -> None:
    """Write the agent as one file that runs with the source's own python3 (3.6+, no install)."""
    path = build_bundle(out)
    out_console.print(
        f"wrote {path} ({human_bytes(path.stat().st_size)}); copy it with its config.json to "
        f"the source and run `python3 {path.name} --config config.json --check`"
    )
