"""Shared test helpers: qemu-img as the oracle, and generated guest content."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mypy_boto3_s3 import S3Client

from rehost.blob.readahead import ReadAheadSource
from rehost.blob.source import LocalFile
from rehost.disk.target import open_disk
from rehost.image import open_image
from rehost.image.convert import convert
from rehost.objectstore import StoreInfo
from rehost.sample import write_sample_disk

MiB = 1 << 20


def run(*args: str | os.PathLike[str]) -> str:
    """Run a command, failing the test with its output if it fails."""
    proc = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def oracle_sha256(image: Path, tmp: Path, fmt: str | None = None) -> str:
    """sha256 of `qemu-img convert -O raw` of the image."""
    out = tmp / (image.name + ".oracle.raw")
    args: list[str | os.PathLike[str]] = ["qemu-img", "convert"]
    if fmt:
        args += ["-f", fmt]
    run(*args, "-O", "raw", image, out)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def rehost_sha256(image: Path, tmp: Path) -> str:
    """sha256 of rehost's conversion of the image to a fresh raw file."""
    out = tmp / (image.name + ".rehost.raw")
    with open_image(LocalFile(image)) as img, open_disk(out, create_size=img.virtual_size) as disk:
        convert(img, disk)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def write_guest(path: Path, size: int, seed: int = 1) -> None:
    """A raw disk with mixed content (see rehost.sample)."""
    write_sample_disk(path, size, seed)


def s3_client(store: StoreInfo) -> S3Client:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key,
        region_name=store.region,
    )


class MemorySource:
    """A RangeSource over bytes, so mutants need not be written to disk."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def name(self) -> str:
        return "memory"

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


class RemoteFile(ReadAheadSource):
    """A local file served through the read-ahead cache, as a remote object would be.

    `delay` seconds per request; counts the requests in flight at once and the reads
    that came back in more than one piece.
    """

    def __init__(self, path: Path, *, delay: float = 0.0, **kw: int) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._file = LocalFile(path)
        self._size, self._name = self._file.size, str(path)
        self.delay = delay
        self.in_flight = self.max_in_flight = self.split_reads = 0
        self._counting = threading.Lock()

    def _fetch(self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]) -> None:
        self._count_request()
        with self._counting:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            for n in sizes:
                piece = self._file.read(start, n)
                self._count_bytes(len(piece))
                deliver(piece)
                start += n
        finally:
            with self._counting:
                self.in_flight -= 1

    def read_parts(self, offset: int, length: int) -> list[bytes | memoryview]:
        parts = super().read_parts(offset, length)
        self.split_reads += len(parts) > 1
        return parts

    def close(self) -> None:
        super().close()
        self._file.close()


def write_scattered(path: Path, *, skip: int = 0) -> None:
    """A 64 MiB raw disk with 512 KiB of random data in every 2 MiB, `skip` bytes in."""
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        for region in range(0, 64 * MiB, 2 * MiB):
            f.seek(region + skip)
            f.write(random.Random(region).randbytes(512 * 1024))


def assert_tables_fetched_ahead(image: Path) -> None:
    """Walked over a slow remote source, the image's extents are those of the local file,
    and its scattered tables were fetched several at once, each about once."""
    with open_image(LocalFile(image)) as img:
        expected = list(img.extents())
    remote = RemoteFile(image, delay=0.02, chunk_size=MiB, cache_bytes=16 * MiB)
    with open_image(remote) as img:
        assert list(img.extents()) == expected
    assert remote.max_in_flight > 1
    assert remote.bytes_fetched <= 2 * image.stat().st_size
