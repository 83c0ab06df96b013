"""The quick-start demo: one small disk through the whole image engine.

It makes a sample disk, packs it into compressed qcow2, inspects and checks the
result, converts it onto a destination disk, and verifies what landed by
re-reading the destination.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rehost.blob.source import LocalFile
from rehost.disk.target import open_disk
from rehost.errors import ImageVerificationError
from rehost.image import open_image
from rehost.image.convert import convert
from rehost.image.digest import read_digest
from rehost.image.pack import pack
from rehost.sample import write_sample_disk

MiB = 1 << 20


@dataclass
class DemoResult:
    workdir: Path
    disk_size: int
    packed_size: int
    digest: str
    steps: list[str]


def run_demo(
    workdir: Path | None = None, *, size: int = 64 * MiB, say: Callable[[str], None] = print
) -> DemoResult:
    """Run every step in `workdir` (a temporary directory, removed afterwards, by default)."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="rehost-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        say(text)

    try:
        sample = work / "sample.raw"
        write_sample_disk(sample, size, seed=7)
        with LocalFile(sample) as src:
            source_digest = read_digest(src.read, src.size)
        step(f"1. made a {size // MiB} MiB sample disk with mixed content: {sample}")

        packed = work / "sample.qcow2"
        with open_image(LocalFile(sample)) as img:
            packed_result = pack(img, packed, compression="zstd")
        step(
            f"2. packed it into compressed qcow2 (zstd): {packed_result.file_size // 1024} KiB "
            f"on disk for {size // MiB} MiB of guest space"
        )

        with open_image(LocalFile(packed)) as img:
            info = img.info()
            report = img.check()
        step(
            f"3. inspected and checked it: {info.format}, cluster {info.cluster_size // 1024} KiB, "
            f"{report.compressed_clusters} compressed clusters all decode to one cluster"
        )

        dest = work / "destination.raw"
        with (
            open_image(LocalFile(packed)) as img,
            open_disk(dest, create_size=img.virtual_size) as disk,
        ):
            result = convert(img, disk)
        step(
            f"4. converted it onto a destination disk in {result.elapsed:.2f}s: "
            f"{result.written_bytes // MiB} MiB written, zeros left sparse"
        )

        with LocalFile(dest) as landed:
            dest_digest = read_digest(landed.read, result.virtual_size)
        if not (dest_digest == result.digest == source_digest):
            raise ImageVerificationError(
                f"the destination's content digest {dest_digest} differs from the source's "
                f"{source_digest}"
            )
        step(f"5. verified the destination by re-reading it: content digest {dest_digest[:16]}…")
        return DemoResult(work, size, packed_result.file_size, dest_digest, steps)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
