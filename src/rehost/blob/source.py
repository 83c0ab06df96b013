"""The byte source every image reader sees: sized, random-access, thread-safe reads.

Readers depend on nothing but this protocol, which is what lets an image stream
straight from object storage onto a disk without a staging copy.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from rehost.errors import SourceNotFound


@runtime_checkable
class RangeSource(Protocol):
    """`read` returns exactly `length` bytes, or fewer only where the object ends.

    A source that holds data in pieces (the read-ahead cache) may also offer
    `read_parts(offset, length)`: the same bytes as a list of buffers, not joined,
    and `prefetch(offset, length)`: a hint that a read of that range will come.
    The functions `read_parts()` and `prefetch()` below use them where they exist.
    """

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class LocalFile:
    """A local file or block device read with `pread`, safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise SourceNotFound(f"{self._path}: no such file") from e
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self._size = st.st_size
        else:
            os.close(self._fd)
            raise SourceNotFound(f"{self._path}: not a regular file or block device")

    @property
    def name(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        length = max(0, min(length, self._size - offset))
        data = os.pread(self._fd, length, offset)
        while len(data) < length:  # pread may return short on some filesystems
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def allocation(self) -> Iterator[tuple[int, int, bool]]:
        """(start, end, has_data) runs from SEEK_DATA/SEEK_HOLE: holes read as zeros.

        This is qemu's block-status for raw files: a sparse raw image converts in
        time proportional to its data. Without hole support it is one data run.
        """
        pos = 0
        while pos < self._size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                    yield pos, self._size, False
                    return
                yield pos, self._size, True  # no hole support: all data
                return
            if data > pos:
                yield pos, min(data, self._size), False
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), self._size)
            if hole > data:
                yield data, hole, True
            pos = max(hole, data + 1) if hole <= data else hole

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_parts(src: RangeSource, offset: int, length: int) -> Sequence[bytes | memoryview]:
    """`src.read(offset, length)` as buffers to be taken one after another.

    Why: a read that spans two cached chunks would otherwise be joined, a copy of
    every byte of a data run on its way from the object store to the disk.
    """
    parts = getattr(src, "read_parts", None)
    return parts(offset, length) if parts is not None else [src.read(offset, length)]


def prefetch(src: RangeSource, offset: int, length: int) -> None:
    """Tell a remote source that [offset, offset + length) will be read soon; else nothing."""
    hint = getattr(src, "prefetch", None)
    if hint is not None:
        hint(offset, length)


def open_source(location: str, *, deadline: float | None = None) -> RangeSource:
    """Open a source by location: `s3://BUCKET/KEY`, an `https://` or `http://` URL, or a path.

    `deadline`: a `time.monotonic()` (the import's timeout) past which a remote source
    sends no request and waits out no backoff, and raises TaskTimeout: a store that is down
    or stalled cannot outlast it (an http(s) source also cuts its socket timeouts to it).
    """
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme == "s3":
        from rehost.blob.s3 import S3Source

        return S3Source.from_url(location, deadline=deadline)
    if scheme in ("http", "https"):
        from rehost.blob.https import HttpsSource

        return HttpsSource(location, deadline=deadline)
    if scheme:
        raise SourceNotFound(
            f"{scheme}:// locations are not supported",
            hint="use s3://BUCKET/KEY, an https:// URL or a local path",
        )
    return LocalFile(location)
