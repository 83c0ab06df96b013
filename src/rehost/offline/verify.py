"""Re-reading the destination to verify it, overlapped with the write.

Why overlap: the re-read hashes every written byte again. Done after the write,
it was 10-20% of a 2 GiB import. A 64 MiB segment is final and durable once
convert() checkpoints it, so a worker re-reads and hashes it then, while later
segments convert; the verify step is left with the last segment.

Why the cache is dropped: the re-read must come from the disk, not from the page
cache the write just filled. Each segment is flushed before it is handed over,
so its pages are clean and POSIX_FADV_DONTNEED drops them; dropping them again
after the read keeps a migration larger than memory from evicting everything else.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from rehost.image.digest import READ_CHUNK, SEGMENT, combine, range_digests

WORKERS = 2
"""Threads that re-read: one keeps up with the write, two shorten the final wait."""
POLL = 0.2
"""Seconds between the waiting thread's progress calls."""


class Verifier:
    """Re-reads [0, size) of the file or device `path`, segment by segment, in workers.

    `submit(end)` hands over everything below `end`: it must be written and flushed and
    not be written again. `digest(poll)` hands over the rest and returns the content
    digest of what the destination holds.
    """

    def __init__(self, path: str, size: int, workers: int = WORKERS) -> None:
        self.size = size
        self.done = 0
        """Bytes re-read (or found to be holes) so far."""
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="verify")
        self._pending: list[Future[dict[int, str]]] = []
        self._submitted = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = threading.Event()

    def submit(self, end: int) -> None:
        for start in range(self._submitted, min(end, self.size), SEGMENT):
            stop = min(start + SEGMENT, self.size)
            self._pending.append(self._pool.submit(self._segment, start, stop))
            self._submitted = stop

    def digest(self, poll: Callable[[int], None]) -> str:
        """Wait for every segment, calling `poll(bytes done)` meanwhile; a raise from it stops."""
        self.submit(self.size)
        segments: dict[int, str] = {}
        for fut in self._pending:
            while True:
                try:
                    segments.update(fut.result(timeout=POLL))
                    break
                except FutureTimeout:
                    poll(self.done)
        poll(self.done)
        return combine(segments, self.size)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)

    def _segment(self, start: int, end: int) -> dict[int, str]:
        os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
        try:
            return range_digests(self._read, start, end, skip=self._hole, progress=self._advance)
        finally:
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _read(self, offset: int, length: int) -> bytearray:
        """Read into this thread's reusable buffer (a full chunk) or a new one (the tail)."""
        if self._closed.is_set():
            raise OSError(errno.ECANCELED, "the verification was stopped")
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(READ_CHUNK)
        if length != len(buf):
            buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                return buf[:got]
            got += n
        return buf

    def _hole(self, start: int, end: int) -> bool:
        """True if [start, end) is wholly a hole (SEEK_DATA finds no data before `end`)."""
        try:
            return os.lseek(self._fd, start, os.SEEK_DATA) >= end
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from `start` on: a hole if the file is long enough
                return os.fstat(self._fd).st_size >= end
            if e.errno == errno.EINVAL:  # no hole support: all data
                return False
            raise

    def _advance(self, n: int) -> None:
        with self._lock:
            self.done += n

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
