"""`rehost import SOURCE --to DEST`: the offline import task, resumable."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rehost.cli.options import Fmt, Json
from rehost.cli.output import emit_json, err_console, human_bytes, out_console, progress_bar

if TYPE_CHECKING:
    from rehost.offline import ImportReport


class Firmware(StrEnum):
    bios = "bios"
    uefi = "uefi"


def _expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 time, e.g. 2030-01-31T12:00:00Z",
            param_hint="--expires-at",
        ) from e


def import_(
    source: Annotated[
        str,
        typer.Argument(
            help="The image: a path, s3://bucket/key, or an https URL (presigned or public)."
        ),
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            help="Destination: a block device, or a raw file (created sparse at the image's "
            "virtual size if missing).",
        ),
    ],
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Keep this import's state and log here (default: "
            "$REHOST_STATE_DIR/imports/<hash of source and destination>, or under "
            "~/.local/state/rehost/imports).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0, help="Stop with TASK_TIMEOUT after this many seconds (resumable)."
        ),
    ] = None,
    expires_at: Annotated[
        str | None,
        typer.Option(
            "--expires-at",
            help="The destination's lease end (ISO 8601; UTC unless it has an offset); "
            "refuse with DESTINATION_EXPIRED past it.",
        ),
    ] = None,
    rate_limit_mbps: Annotated[
        float | None,
        typer.Option(
            "--rate-limit-mbps", min=0, help="Cap reads from the source at this many megabits/s."
        ),
    ] = None,
    fmt: Fmt = None,
    fixup: Annotated[
        bool,
        typer.Option(
            "--fixup",
            help="After verification, make the imported system boot here: fstab, grub, "
            "initramfs with virtio drivers, network to DHCP, cloud-init reset (docs/fixups.md).",
        ),
    ] = False,
    firmware: Annotated[
        Firmware,
        typer.Option("--firmware", help="With --fixup: the destination's firmware."),
    ] = Firmware.bios,
    json: Json = False,
) -> None:
    """Import a disk image onto a block device or raw file: precheck, write, verify.

    Run the same command again after an interruption (crash, kill, timeout) to resume
    from the last checkpoint; the whole destination is verified in the end either way.
    """
    lease = _expiry(expires_at)
    from rehost.offline import run_import  # boto3 is slow to import

    report = run_import(
        source,
        to,
        state_dir=state_dir,
        timeout=timeout,
        expires_at=lease,
        format=fmt,
        rate_limit_mbps=rate_limit_mbps,
        fixup=fixup,
        firmware=firmware.value,
        progress=lambda description, total: progress_bar(description, total, not json),
        notify=lambda message: err_console.print(message, markup=False, soft_wrap=True),
    )
    if json:
        emit_json(report.to_dict())
        return
    _print_report(report)


def _print_report(r: ImportReport) -> None:
    fmt = r.format + (f" ({r.subformat})" if r.subformat else "")
    rows = [
        ("virtual size", f"{human_bytes(r.virtual_size)} ({r.virtual_size} bytes)"),
        ("image file", f"{human_bytes(r.file_size)}, {fmt}"),
        ("data", f"{human_bytes(r.data_bytes)} of guest data in the image"),
    ]
    if r.resumed_from:
        rows.append(("resumed from", f"{human_bytes(r.resumed_from)} ({r.resumed_from} bytes)"))
    rows.append(("this run", f"{human_bytes(r.processed_bytes)} processed"))
    rows.append(("written", human_bytes(r.written_bytes)))
    read = f"{human_bytes(r.source_bytes_read)} read from the source"
    if r.bytes_fetched is not None:
        read += f", {human_bytes(r.bytes_fetched)} fetched"
        if r.requests is not None:
            read += f" in {r.requests} requests"
    rows.append(("source", read))
    rows.append(
        (
            "time",
            f"{r.elapsed:.2f}s (write {r.write_seconds:.2f}s at {human_bytes(r.rate)}/s, "
            f"verify {r.verify_seconds:.2f}s)",
        )
    )
    rows.append(("verified", f"ok, content digest {r.digest}"))
    if r.fixups is not None:
        changes, commands = r.fixups.get("changes"), r.fixups.get("commands")
        n_changes = len(changes) if isinstance(changes, list) else 0
        n_commands = len(commands) if isinstance(commands, list) else 0
        rows.append(
            ("fixups", f"{r.fixups.get('distro')}: {n_changes} changes, {n_commands} commands")
        )
    out_console.print(f"imported {r.source} -> {r.destination}", markup=False, soft_wrap=True)
    for key, value in rows:
        out_console.print(f"{key:>13}: {value}", markup=False, soft_wrap=True)
