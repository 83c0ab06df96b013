"""`rehost objectstore start|stop|status`: the local S3 store, for users and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rehost import objectstore
from rehost.cli.options import Json
from rehost.cli.output import emit_json, out_console, state_dir

app = typer.Typer(
    help="Run a local S3-compatible object store (SeaweedFS) for trying rehost out.",
    no_args_is_help=True,
    add_completion=False,
)

Dir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="The store's directory (default: $REHOST_STATE_DIR/objectstore, or "
        "~/.local/state/rehost/objectstore).",
    ),
]


def _dir(directory: Path | None) -> Path:
    return directory or state_dir() / "objectstore"


def _show(info: objectstore.StoreInfo, json: bool, bucket: str | None = None) -> None:
    if json:
        emit_json({**info.__dict__, "env": info.env(), **({"bucket": bucket} if bucket else {})})
        return
    out_console.print(
        f"running: pid {info.pid}, endpoint {info.endpoint}, data in {info.directory}"
    )
    if bucket:
        out_console.print(f"bucket: s3://{bucket}")
    out_console.print("use it with:")
    for key, value in info.env().items():
        out_console.print(f"  export {key}={value}")


@app.command()
def start(
    directory: Dir = None,
    bucket: Annotated[
        str, typer.Option("--bucket", help="A bucket to have ready in it (made if missing).")
    ] = "rehost",
    json: Json = False,
) -> None:
    """Start the store (or show the one already running) and print how to use it."""
    info = objectstore.start(_dir(directory))
    objectstore.ensure_bucket(info, bucket)
    _show(info, json, bucket)


@app.command()
def status(directory: Dir = None, json: Json = False) -> None:
    """Show whether the store is running; exit 1 if it is not."""
    info = objectstore.status(_dir(directory))
    if info is None:
        if json:
            emit_json({"running": False})
        else:
            out_console.print("not running")
        raise typer.Exit(1)
    _show(info, json)


@app.command()
def stop(directory: Dir = None) -> None:
    """Stop the store; its data stays in its directory."""
    stopped = objectstore.stop(_dir(directory))
    out_console.print("stopped" if stopped else "not running")
