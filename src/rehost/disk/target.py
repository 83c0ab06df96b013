"""The destination disk: a block device or a raw file, written with pwrite.

Zeroing uses the cheapest primitive that leaves zeros behind (BLKZEROOUT on a
device, a punched hole in a file) and is skipped where the disk is known to be
zero already, e.g. a file this process just created sparse.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from rehost.errors import DestinationError

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_libc = ctypes.CDLL(None, use_errno=True)  # fallocate(2): os.posix_fallocate cannot punch holes


class Disk:
    def __init__(self, path: str, fd: int, size: int, *, is_block: bool, known_zero: bool) -> None:
        self.path = path
        self.size = size
        self.is_block = is_block
        self.known_zero = known_zero
        """True when every byte is already zero, so zero() has nothing to do."""
        self._fd = fd

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DestinationError(
                f"write of {length} bytes at {offset} would pass the end of {self.path} "
                f"({self.size} bytes)"
            )

    def write(self, offset: int, *parts: bytes | bytearray | memoryview) -> None:
        """Write `parts` one after another from `offset`: one pwritev, not a join and a pwrite."""
        self._check_range(offset, sum(len(p) for p in parts))
        views = [memoryview(p) for p in parts if len(p)]
        first = 0
        while first < len(views):
            n = os.pwritev(self._fd, views[first : first + _IOV_MAX], offset)
            offset += n
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]

    def zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self.known_zero or length == 0:
            return
        try:
            if self.is_block:
                fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            else:
                _punch_hole(self._fd, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(offset, _ZERO_CHUNK[:n])
            offset += n

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    rc = _libc.fallocate(
        fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_disk(path: str | os.PathLike[str], create_size: int | None = None) -> Disk:
    """Open a block device or raw file for writing; create the file sparse if it is missing."""
    p = os.fspath(path)
    try:
        if create_size is not None and not os.path.exists(p):
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, create_size)
            return Disk(p, fd, create_size, is_block=False, known_zero=True)
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DestinationError(f"{p}: {e.strerror}") from e
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        return Disk(p, fd, size, is_block=True, known_zero=False)
    if stat.S_ISREG(st.st_mode):
        return Disk(p, fd, st.st_size, is_block=False, known_zero=False)
    os.close(fd)
    raise DestinationError(f"{p}: not a block device or regular file")
