"""The byte source every image reader sees: sized, random-access, thread-safe reads.

Readers depend on nothing but this protocol, which is what lets an image stream
straight from object storage onto a disk without a staging copy.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol, runtime_checkable

from rehost.errors import SourceNotFound


@runtime_checkable
class RangeSource(Protocol):
    """`read` returns exactly `length` bytes, or fewer only where the object ends."""

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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(location: str) -> RangeSource:
    """Open a source by location. Only local paths for now; s3:// and https:// come later."""
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise SourceNotFound(f"{location}: the {scheme}:// scheme is not supported yet")
    return LocalFile(location)
