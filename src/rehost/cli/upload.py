"""`rehost upload FILE s3://BUCKET/KEY`: a parallel, resumable multipart upload."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from rehost.cli.options import Json
from rehost.cli.output import emit_json, human_bytes, out_console, progress_bar


class _Phases:
    """One progress bar per phase of the upload, each closed when the next opens."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._current: contextlib.AbstractContextManager[Any] | None = None

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        self.close()
        self._current = progress_bar(description, total, self.enabled)
        advance: Callable[[int], None] = self._current.__enter__()
        return advance

    def close(self) -> None:
        if self._current is not None:
            current, self._current = self._current, None
            current.__exit__(None, None, None)


def upload(
    file: Annotated[
        Path, typer.Argument(help="The file to upload, e.g. a disk image.", show_default=False)
    ],
    dest: Annotated[
        str,
        typer.Argument(
            help="s3://BUCKET/KEY (a KEY ending in / gets the file's name).", show_default=False
        ),
    ],
    part_size_mib: Annotated[
        int,
        typer.Option(
            "--part-size-mib",
            min=5,
            max=5120,
            help="Part size in MiB; raised automatically so the file fits in 10000 parts.",
        ),
    ] = 16,
    threads: Annotated[
        int, typer.Option("--threads", min=1, max=64, help="Parts sent in parallel.")
    ] = 4,
    limit_mbps: Annotated[
        float | None,
        typer.Option(
            "--limit-mbps",
            min=0.001,
            help="Cap the average upload rate, in megabits per second.",
            show_default=False,
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Where interrupted uploads are remembered "
            "(default: $REHOST_STATE_DIR/uploads or ~/.local/state/rehost/uploads).",
            show_default=False,
        ),
    ] = None,
    json: Json = False,
) -> None:
    """Upload FILE to S3 in parallel parts; run the same command again to resume.

    An interrupted upload (killed, network lost) continues where it stopped: only the parts the server does not have are sent. If FILE changed since, the upload starts over and says why. Each part's checksum (CRC32C, or Content-MD5 where the store lacks CRC32C; a file of one part goes in one PUT checked by Content-MD5) is checked by the server, and the finished object is verified against the file (its checksum, ETag and size).

    Upload a compressed image to shorten the upload: `rehost image pack IMAGE packed.qcow2` leaves out zero regions and compresses the rest, often making the file several times smaller.

    Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION); REHOST_S3_ADDRESSING=path|virtual|auto sets the addressing style.
    """
    try:
        from rehost.blob.upload import MiB, parse_s3_url, upload_file  # boto3 is slow to import

        bucket, key = parse_s3_url(dest, file.name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="DEST") from e

    def notify(message: str) -> None:
        sys.stderr.write(f"note: {message}\n")
        sys.stderr.flush()

    phases = _Phases(enabled=not json)
    try:
        result = upload_file(
            file,
            bucket,
            key,
            part_size=part_size_mib * MiB,
            threads=threads,
            state_dir=state_dir,
            limit_mbps=limit_mbps,
            progress=phases,
            notify=notify,
        )
    finally:
        phases.close()
    if json:
        emit_json({"source": str(file), "destination": f"s3://{bucket}/{key}", **result.to_dict()})
        return
    how = "resumed" if result.resumed else "uploaded"
    out_console.print(
        f"{how} {file} -> s3://{bucket}/{key}: {human_bytes(result.size)} in {result.parts} "
        f"part(s); {human_bytes(result.bytes_uploaded_this_run)} sent this run "
        f"({result.parts_uploaded_this_run} part(s)), {human_bytes(result.bytes_skipped)} "
        f"already uploaded; {result.elapsed:.1f}s, {human_bytes(result.rate)}/s\n"
        f"verified: {result.verification}",
        soft_wrap=True,
    )
