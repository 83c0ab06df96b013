"""`rehost image ...`: inspect, check, convert and pack disk images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rehost.blob.source import open_source
from rehost.cli.options import Fmt, Json
from rehost.cli.output import emit_json, human_bytes, out_console, progress_bar
from rehost.disk.target import open_disk
from rehost.image import open_image
from rehost.image.base import DiskImage
from rehost.image.convert import convert as convert_image
from rehost.image.convert import survey

app = typer.Typer(
    help="Inspect, check, convert and pack disk images.", no_args_is_help=True, add_completion=False
)

Src = Annotated[
    str,
    typer.Argument(
        help="The image (qcow2, vhd, vhdx, vmdk or raw): a path, s3://BUCKET/KEY or an https URL."
    ),
]


def _open(src: str, fmt: str | None) -> DiskImage:
    source = open_source(src)
    try:
        return open_image(source, fmt)
    except BaseException:
        source.close()  # a refused image leaves its source to us
        raise


@app.command()
def inspect(src: Src, fmt: Fmt = None, json: Json = False) -> None:
    """Report format, sizes, allocation, cluster size, compression and the safety checks passed."""
    with _open(src, fmt) as img:
        info = img.info()
        plan = survey(img)
    data = {
        "source": src,
        "format": info.format,
        "subformat": info.subformat,
        "virtual_size": info.virtual_size,
        "file_size": info.file_size,
        "allocated_bytes": plan.data_bytes,
        "cluster_size": info.cluster_size,
        "compression": info.compression,
        "checks": info.checks,
        "details": info.details,
    }
    if json:
        emit_json(data)
        return
    rows = [
        ("format", f"{info.format}" + (f" ({info.subformat})" if info.subformat else "")),
        ("virtual size", f"{human_bytes(info.virtual_size)} ({info.virtual_size} bytes)"),
        ("file size", f"{human_bytes(info.file_size)} ({info.file_size} bytes)"),
        ("allocated", f"{human_bytes(plan.data_bytes)} ({plan.data_bytes} bytes)"),
        ("cluster size", human_bytes(info.cluster_size) if info.cluster_size else "-"),
        ("compression", info.compression or "none"),
    ]
    for key, value in rows:
        out_console.print(f"{key:>13}: {value}")
    for key, value in info.details.items():
        out_console.print(f"{key:>13}: {value}")
    out_console.print(f"{'checks':>13}:")
    for check in info.checks:
        out_console.print(f"{'':>13}  ok  {check}")


@app.command()
def check(src: Src, fmt: Fmt = None, json: Json = False) -> None:
    """Validate every table and every compressed cluster; exit 0 only if all is consistent."""
    with _open(src, fmt) as img, progress_bar("checking", img.virtual_size, not json) as advance:
        report = img.check(advance)
    data = {"source": src, "consistent": True, **report.__dict__}
    if json:
        emit_json(data)
        return
    out_console.print(
        f"{src}: consistent; {report.extents} extents, {human_bytes(report.data_bytes)} data, "
        f"{report.compressed_clusters} compressed clusters "
        f"({human_bytes(report.compressed_bytes)}), {human_bytes(report.zero_bytes)} zero"
    )


@app.command()
def convert(
    src: Src,
    dest: Annotated[
        Path, typer.Argument(help="Raw file (created sparse if missing) or block device.")
    ],
    fmt: Fmt = None,
    digest: Annotated[
        bool,
        typer.Option(
            "--digest",
            help="Also hash the guest content (rehost-content-v2), to compare with a re-read later.",
        ),
    ] = False,
    json: Json = False,
) -> None:
    """Write the image's guest bytes as raw onto a file or block device."""
    with _open(src, fmt) as img:
        created = not dest.exists()
        disk = open_disk(dest, create_size=img.virtual_size)
        try:
            with disk, progress_bar("converting", img.virtual_size, not json) as advance:
                result = convert_image(img, disk, progress=advance, digest=digest)
        except BaseException:
            if created:
                os.unlink(dest)
            raise
    data = {"source": src, "destination": str(dest), "format": img.format, **result.__dict__}
    if json:
        emit_json(data)
        return
    out_console.print(
        f"converted {src} ({img.format}) -> {dest}: {human_bytes(result.virtual_size)} in "
        f"{result.elapsed:.2f}s ({human_bytes(result.rate)}/s), "
        f"{human_bytes(result.written_bytes)} written"
        + (f"\ncontent digest {result.digest}" if result.digest else "")
    )


@app.command()
def pack(
    src: Src,
    dest: Annotated[Path, typer.Argument(help="Output qcow2 file.")],
    compression: Annotated[
        str, typer.Option(help="zstd (faster, smaller) or zlib (readable by older qemu).")
    ] = "zstd",
    fmt: Fmt = None,
    json: Json = False,
) -> None:
    """Pack any supported image into a compressed qcow2: a smaller, faster upload.

    Zero regions take no space; `qemu-img check` accepts the result.
    """
    if compression not in ("zstd", "zlib"):
        raise typer.BadParameter("must be zstd or zlib", param_hint="--compression")
    from rehost.image.pack import pack as pack_image  # here: the other commands skip its import

    with _open(src, fmt) as img, progress_bar("packing", img.virtual_size, not json) as advance:
        result = pack_image(img, dest, compression=compression, progress=advance)
    data = {"source": src, "destination": str(dest), "compression": compression, **result.__dict__}
    if json:
        emit_json(data)
        return
    out_console.print(
        f"packed {src} -> {dest} ({compression}): {human_bytes(result.virtual_size)} virtual, "
        f"{human_bytes(result.file_size)} file, in {result.elapsed:.2f}s"
    )
