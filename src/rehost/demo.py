"""The quick-start demo: a whole offline migration on the embedded default.

It starts a local object store (SeaweedFS) unless one is running, makes a
sample disk, packs it into compressed qcow2, uploads it, imports it from the
object store onto a file-backed destination disk, and checks that what landed
is the sample disk's content. It stops what it started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rehost import objectstore
from rehost.blob.source import LocalFile
from rehost.blob.upload import upload_file
from rehost.errors import ImageVerificationError
from rehost.image import open_image
from rehost.image.digest import read_digest
from rehost.image.pack import pack
from rehost.offline.task import run_import
from rehost.sample import write_sample_disk

MiB = 1 << 20
BUCKET = "rehost-demo"


@dataclass
class DemoResult:
    workdir: Path
    disk_size: int
    packed_size: int
    digest: str
    import_seconds: float
    steps: list[str]


@contextmanager
def local_store(directory: Path, say: Callable[[str], None]) -> Iterator[objectstore.StoreInfo]:
    """Use the store running in `directory`, or start one and stop it afterwards."""
    running = objectstore.status(directory)
    info = running or objectstore.start(directory)
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if running is None:
            objectstore.stop(directory)
            say("   stopped the object store the demo started")


def run_demo(
    state: Path,
    workdir: Path | None = None,
    *,
    size: int = 64 * MiB,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Run every step; files go to `workdir` (a temporary directory, removed afterwards)."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="rehost-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        say(text)

    try:
        with local_store(state / "objectstore", say) as store:
            step(f"1. object store: SeaweedFS at {store.endpoint}, data in {store.directory}")
            objectstore.ensure_bucket(store, BUCKET)
            step(f"2. bucket s3://{BUCKET} is ready")

            sample = work / "sample.raw"
            write_sample_disk(sample, size, seed=7)
            with LocalFile(sample) as src:
                source_digest = read_digest(src.read, src.size)
            packed = work / "sample.qcow2"
            with open_image(LocalFile(sample)) as img:
                packed_result = pack(img, packed, compression="zstd")
            step(
                f"3. made a {size // MiB} MiB sample disk with mixed content and packed it into "
                f"compressed qcow2: {packed_result.file_size / MiB:.1f} MiB to upload"
            )

            key = "sample.qcow2"
            up = upload_file(packed, BUCKET, key, part_size=8 * MiB, state_dir=work / "uploads")
            step(f"4. uploaded it to s3://{BUCKET}/{key} in {up.parts} parts, checksum verified")

            dest = work / "destination-disk.raw"
            dest.unlink(missing_ok=True)
            report = run_import(f"s3://{BUCKET}/{key}", dest, state_dir=work / "import")
            step(
                f"5. imported it onto {dest.name}: {report.virtual_size // MiB} MiB in "
                f"{report.elapsed:.2f}s, {report.bytes_fetched or 0} bytes fetched, "
                f"destination re-read and verified"
            )

            if report.digest != source_digest:
                raise ImageVerificationError(
                    f"the destination's content digest {report.digest} differs from the sample "
                    f"disk's {source_digest}"
                )
            step(f"6. the destination holds the sample disk byte for byte ({report.digest[:16]}…)")
        return DemoResult(work, size, packed_result.file_size, report.digest, report.elapsed, steps)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
