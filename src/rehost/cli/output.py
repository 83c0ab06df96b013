"""How the CLI speaks: errors as `error: CODE: message` plus a hint, progress on a TTY, JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rehost.errors import RehostError, SystemError_

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("rehost")


class _Output:
    """rich on a terminal, plain print() otherwise.

    Importing rich costs ~40 ms of every command's start-up, which is a measurable
    share of converting a small image; scripts and pipes never need it.
    """

    def __init__(self, stream: str) -> None:
        self._stream = stream
        self._rich: Console | None = None

    def _file(self) -> TextIO:
        return sys.stderr if self._stream == "stderr" else sys.stdout

    def rich(self) -> Console:
        if self._rich is None:
            from rich.console import Console

            self._rich = Console(stderr=self._stream == "stderr", highlight=False, soft_wrap=True)
        return self._rich

    def print(self, *objects: Any, markup: bool = False, soft_wrap: bool = True) -> None:
        """Markup is off unless asked for: what is printed often holds text from an image,
        a server or a path, and "[/x]" in it would be taken for a tag (or fail as one)."""
        if self._file().isatty():
            self.rich().print(*objects, markup=markup, soft_wrap=soft_wrap)
        else:
            print(*objects, file=self._file(), flush=True)


err_console = _Output("stderr")
out_console = _Output("stdout")


def state_dir() -> Path:
    """Where rehost keeps its logs and local services: $REHOST_STATE_DIR or the XDG state dir."""
    base = os.environ.get("REHOST_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "rehost"
    )
    return Path(base)


def log_path() -> Path:
    return state_dir() / "log" / "rehost.log"


LOG_BYTES = 16 << 20
"""Bytes of rehost.log before it rotates (three old ones are kept)."""


def setup_logging() -> logging.Handler:
    """Add the log file's handler; the caller removes it (see `end_logging`) when done."""
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # rotated: a receiver faces the internet, and a rescue system's disk is small
        handler: logging.Handler = RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=3)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def end_logging(handler: logging.Handler) -> None:
    """Run in one process again (tests, an embedding program), main() must not add a second
    handler that writes every line twice, nor keep the log file open once per run."""
    log.removeHandler(handler)
    handler.close()


_json_errors = False


def errors_as_json(value: bool) -> bool:
    """--json's callback: a command asked for JSON gets its failure as JSON too, so that a
    script reading stdout never finds it empty."""
    global _json_errors
    _json_errors = value
    return value


def report_error(exc: BaseException) -> int:
    """Print a failure the documented way and return the exit status (1)."""
    if not isinstance(exc, RehostError):
        log.error("unexpected failure:\n%s", "".join(traceback.format_exception(exc)))
        exc = SystemError_(f"{type(exc).__name__}: {exc} (details in {log_path()})")
    else:
        log.error("%s: %s", exc.code, exc)
    sys.stderr.write(f"error: {exc.code}: {exc}\nhint: {exc.hint}\n")
    if _json_errors:
        emit_json({"status": "failed", "error": exc.to_dict()})
    return 1


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextmanager
def progress_bar(description: str, total: int, enabled: bool) -> Iterator[Any]:
    """Yield a callback taking a byte count; draws a bar with rate and ETA on a TTY only."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console.rich(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
