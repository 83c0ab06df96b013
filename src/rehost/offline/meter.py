"""A source wrapper that counts the bytes read and, optionally, paces them to a bandwidth cap."""

from __future__ import annotations

import threading
import time
from typing import Any

from rehost.blob.source import RangeSource


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
        if self.rate:
            with self._lock:
                now = time.monotonic()
                start = max(self._next, now)
                self._next = start + length / self.rate
            if start > now and self._cancelled.wait(start - now):
                raise Cancelled("the import is stopping")
        data = self.inner.read(offset, length)
        with self._lock:
            self.bytes_read += len(data)
            self.reads += 1
        return data

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks: the inner source's counters and tags.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
