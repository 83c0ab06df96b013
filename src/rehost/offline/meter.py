"""A source wrapper that counts the bytes read and, optionally, paces them to a bandwidth cap."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from rehost.blob.source import RangeSource, prefetch, read_parts


class Cancelled(Exception):
    """A paced read was abandoned because the import is stopping."""


class MeteredSource:
    """Counts the bytes handed to the image reader; with a rate, paces reads to that rate.

    Pacing reserves each read's share of the rate before it starts, so parallel readers
    together stay under the cap. `cancel()` wakes any reader that is waiting its turn.
    Other attributes (`bytes_fetched`, `requests`, `etag`, ...) come from the inner source.
    """

    def __init__(self, inner: RangeSource, bytes_per_second: float | None = None) -> None:
        self.inner = inner
        self.rate = bytes_per_second if bytes_per_second and bytes_per_second > 0 else None
        self.bytes_read = 0
        self.reads = 0
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._cancelled = threading.Event()

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        self._pace(length)
        data = self.inner.read(offset, length)
        self._count(len(data))
        return data

    def read_parts(self, offset: int, length: int) -> Sequence[bytes | memoryview]:
        self._pace(length)
        parts = read_parts(self.inner, offset, length)
        self._count(sum(len(p) for p in parts))
        return parts

    def prefetch(self, offset: int, length: int) -> None:
        prefetch(self.inner, offset, length)  # counted and paced when it is read

    def _pace(self, length: int) -> None:
        if self.rate:
            with self._lock:
                now = time.monotonic()
                start = max(self._next, now)
                self._next = start + length / self.rate
            if start > now and self._cancelled.wait(start - now):
                raise Cancelled("the import is stopping")

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self.reads += 1

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks: the inner source's counters and tags.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
