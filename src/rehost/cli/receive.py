"""`rehost receive`: the destination side of an online migration, run in migration mode.

It only parses and checks the command line; rehost.online.receiver.server does the work.
A successful finalize ends migration mode: the server stops, and with `--reboot` the machine
reboots into the migrated system.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from rehost.errors import RehostError


def parse_listen(value: str) -> tuple[str, int]:
    """'ADDR:PORT', ':PORT' (all addresses) or '[v6]:PORT' -> (addr, port)."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:\s]*)):(\d{1,5})", value)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise typer.BadParameter(
            f"expected ADDR:PORT or :PORT, not {value!r}", param_hint="--listen"
        )
    return match.group(1) or match.group(2) or "0.0.0.0", int(match.group(3))


def parse_pairs(values: list[str], option: str, numeric: bool) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; keys unique, numeric keys ≥ 1 when `numeric`."""
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise typer.BadParameter(f"expected KEY=VALUE, not {value!r}", param_hint=option)
        if numeric and (not key.isdigit() or int(key) < 1):
            raise typer.BadParameter(f"the index must be 1 or more, not {key!r}", param_hint=option)
        if key in pairs:
            raise typer.BadParameter(f"{key} is given twice", param_hint=option)
        pairs[str(int(key)) if numeric else key] = rest
    return pairs


MIN_TOKEN = 16
"""Characters a token must have: a migration-mode receiver often faces the internet."""


def read_token(path: Path) -> str:
    """The token in `path`. A missing file is created (0600) with a random token, and the
    command says so: the operator then copies it into the agent's config."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise typer.BadParameter(
            f"cannot create {path}: {e.strerror}", param_hint="--token-file"
        ) from e
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        print(f"wrote a new token to {path}: put it in the agent's config as Destination.Token")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise typer.BadParameter(
            f"cannot read {path}: {e.strerror}", param_hint="--token-file"
        ) from e
    if len(token) < MIN_TOKEN:
        raise typer.BadParameter(
            f"the token in {path} has {len(token)} characters: use at least {MIN_TOKEN} "
            "random ones, since anyone who reaches the port can guess at it (remove the file "
            "and this command writes one)",
            param_hint="--token-file",
        )
    return token


class RebootFailed(RehostError):
    code = "REBOOT_FAILED"
    message = "the migration is finalized but the machine could not be rebooted"
    default_hint = "the destination disks are ready: reboot the machine by hand"


def reboot() -> None:
    """Leave migration mode for good: `systemctl reboot`, else `reboot`."""
    tried = []
    for argv in (["systemctl", "reboot"], ["reboot"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True)
        except OSError as e:
            tried.append(f"{argv[0]}: {e.strerror}")
            continue
        if proc.returncode == 0:
            return
        tried.append(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    raise RebootFailed("; ".join(tried))


def receive(
    token_file: Annotated[
        Path,
        typer.Option(
            "--token-file",
            help="File holding the migration's secret token (16 characters or more); "
            "created with a random one if missing.",
        ),
    ],
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Journal, TLS certificate, mounts and fingerprint."),
    ],
    listen: Annotated[
        str, typer.Option("--listen", help="ADDR:PORT or :PORT to serve TLS on.")
    ] = "0.0.0.0:443",
    system_disk: Annotated[
        str | None, typer.Option("--system-disk", help="Destination disk 0 (block device).")
    ] = None,
    data_disk: Annotated[
        list[str] | None,
        typer.Option("--data-disk", help="INDEX=DEV: destination data disk INDEX (1, 2, ...)."),
    ] = None,
    root: Annotated[
        list[str] | None,
        typer.Option(
            "--root",
            help="FSID=DIR: receive filesystem FSID into an existing directory instead of a "
            "disk (testing and advanced use).",
        ),
    ] = None,
    reboot_after: Annotated[
        bool,
        typer.Option(
            "--reboot",
            help="Reboot into the migrated system once the agent's finalize has succeeded.",
        ),
    ] = False,
    no_fixups: Annotated[
        bool,
        typer.Option(
            "--no-fixups",
            help="Skip the boot fixups in the finalize (a data-only migration, or a system "
            "you fix up yourself).",
        ),
    ] = False,
) -> None:
    """Receive a migration: serve TLS, check the token, write the source's files to disks.

    Returns (exit 0) once the agent's finalize has made the disks ready to boot.
    """
    from rehost.online.receiver.server import serve

    addr, port = parse_listen(listen)
    disks = parse_pairs(data_disk or [], "--data-disk", numeric=True)
    if system_disk is not None:
        disks["0"] = system_disk
    roots = {k: Path(v) for k, v in parse_pairs(root or [], "--root", numeric=False).items()}
    if not disks and not roots:
        raise typer.BadParameter(
            "give the destination disks (or --root FSID=DIR)", param_hint="--system-disk"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    host = f"[{addr}]" if ":" in addr else addr
    serve(
        f"{host}:{port}",
        read_token(token_file),
        state_dir,
        disks,
        roots=roots or None,
        on_finalized=_reboot_now if reboot_after else None,
        fixups=not no_fixups,
    )


def _reboot_now() -> None:
    print("rebooting into the migrated system", flush=True)
    reboot()  # looked up at call time, so a test can replace it
