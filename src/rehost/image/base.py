"""The interface every format driver implements, after qemu's block drivers.

A driver turns a `RangeSource` into an ordered stream of `Extent`s (qemu's
block-status idea: the converter learns where the zeros are without reading
them) and reads any extent's guest bytes, verifying what its format allows.

Driver contract:
- `extents()` yields contiguous, non-overlapping extents in guest order that
  cover exactly [0, virtual_size). It validates every table entry it walks
  (inside the file, aligned, not overlapping headers or tables) and raises
  `ImageMetadataError` instead of yielding anything doubtful.
- DATA extents are host-contiguous: guest byte `offset + i` is file byte
  `host_offset + i`, so a DATA extent may be split freely.
- COMPRESSED extents are one cluster or grain each; `read` decompresses and
  checks that the stream yields exactly `length` bytes.
- Memory is bounded: tables are read lazily or in bounded slices, never sized
  from an unchecked header field.
- `read` is thread-safe and may run in worker threads while `extents()` is
  being iterated.
- A driver that changes the bytes `read_exact` returns (VHDX's log replay)
  overrides `read_parts` too, which takes DATA runs from the source directly.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from rehost.blob.source import RangeSource, prefetch, read_parts
from rehost.errors import ImageMetadataError

MAX_VIRTUAL_SIZE = 64 << 40  # 64 TiB: anything larger is treated as hostile geometry
_window = threading.local()


class ExtentKind(enum.Enum):
    DATA = "data"
    ZERO = "zero"
    COMPRESSED = "compressed"


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: ExtentKind
    host_offset: int = 0
    """DATA: file offset of the first guest byte. COMPRESSED: file offset of the stream."""
    host_length: int = 0
    """COMPRESSED: how many file bytes to read for the stream (may include slack)."""
    codec: str = ""
    """COMPRESSED: the stream's codec, one of "deflate" (raw), "zlib" or "zstd"."""

    @property
    def end(self) -> int:
        return self.offset + self.length

    def cut(self, start: int, end: int) -> Extent:
        """The part of a DATA or ZERO extent in guest range [start, end)."""
        if start == self.offset and end == self.end:
            return self
        if self.kind is ExtentKind.COMPRESSED:
            raise ValueError(f"a compressed cluster at {self.offset} cannot be cut at {start}")
        host = self.host_offset + start - self.offset if self.kind is ExtentKind.DATA else 0
        return Extent(start, end - start, self.kind, host)

    def split(self, max_length: int) -> Iterator[Extent]:
        """Cut a DATA or ZERO extent into pieces of at most max_length bytes."""
        if self.kind is ExtentKind.COMPRESSED:
            yield self
            return
        for start in range(self.offset, self.end, max_length):
            yield self.cut(start, min(self.end, start + max_length))


ProgressFn = Callable[[int], None]
"""Called with a count of guest bytes just processed."""


@dataclass
class CheckReport:
    extents: int = 0
    data_bytes: int = 0
    compressed_bytes: int = 0
    zero_bytes: int = 0
    compressed_clusters: int = 0


@dataclass
class ImageInfo:
    format: str
    subformat: str
    virtual_size: int
    file_size: int
    cluster_size: int
    compression: str | None
    checks: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class DiskImage(ABC):
    format: ClassVar[str]

    def __init__(self, src: RangeSource) -> None:
        self.src = src
        self.file_size = src.size
        self.subformat = ""
        self.virtual_size = 0
        self.cluster_size = 0
        """The allocation unit: cluster, block or grain size (0 where there is none)."""
        self.compression: str | None = None
        self.checks: list[str] = []
        """Safety checks passed at open, named for `rehost image inspect`."""
        self.details: dict[str, Any] = {}
        """Format-specific facts for `inspect` (version, features, table sizes...)."""

    # -- what drivers implement -------------------------------------------------

    @abstractmethod
    def extents(self) -> Iterator[Extent]: ...

    def decompress(self, extent: Extent) -> bytes:
        raise ImageMetadataError(f"{self.format} has no compressed extents", hint=None)

    # -- shared behaviour -------------------------------------------------------

    def read(self, extent: Extent) -> bytes:
        if extent.kind is ExtentKind.ZERO:
            return bytes(extent.length)
        if extent.kind is ExtentKind.COMPRESSED:
            return self.decompress(extent)
        return self.read_exact(extent.host_offset, extent.length, "data")

    def read_parts(self, extent: Extent) -> Sequence[bytes | memoryview]:
        """`read(extent)` as buffers to take in turn: a DATA run comes uncopied from the source."""
        if extent.kind is not ExtentKind.DATA:
            return [self.read(extent)]
        offset, length = extent.host_offset, extent.length
        self._check_inside(offset, length, "data")
        held = self._windowed(offset, length)
        if held is not None:  # a view, if the run is most of the window it keeps alive
            return [held if 2 * length >= len(cast(bytes, held.obj)) else held.tobytes()]
        parts = read_parts(self.src, offset, length)
        self._check_length(offset, length, sum(len(p) for p in parts), "data")
        return parts

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read from the file, refusing as truncated if it ends early."""
        data = self.read_buffer(offset, length, what)
        return data if isinstance(data, bytes) else data.tobytes()

    def read_buffer(self, offset: int, length: int, what: str) -> bytes | memoryview:
        """`read_exact` for a reader that takes any buffer (a decompressor): inside this
        thread's host window, a view of it instead of a copy of every compressed byte."""
        self._check_inside(offset, length, what)
        held = self._windowed(offset, length)
        if held is not None:
            return held
        data = self.src.read(offset, length)
        self._check_length(offset, length, len(data), what)
        return data

    def _windowed(self, offset: int, length: int) -> memoryview | None:
        """[offset, offset + length) of the file, if this thread's host window holds it."""
        window: tuple[RangeSource, int, memoryview] | None = getattr(_window, "w", None)
        if window is not None and window[0] is self.src:
            start = offset - window[1]
            if start >= 0 and start + length <= len(window[2]):
                return window[2][start : start + length]
        return None

    def _check_inside(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or offset + length > self.file_size:
            raise ImageMetadataError(
                f"{what} at offset {offset} (+{length} bytes) lies beyond the end of the "
                f"{self.file_size}-byte file; the image is truncated or corrupt"
            )

    @staticmethod
    def _check_length(offset: int, length: int, got: int, what: str) -> None:
        if got != length:
            raise ImageMetadataError(
                f"{what} at offset {offset}: read {got} of {length} bytes; the image is truncated"
            )

    @contextmanager
    def host_window(self, start: int, end: int) -> Iterator[None]:
        """Read [start, end) of the file once; this thread's reads inside it come from memory.

        Compressed clusters are small and usually packed back to back, so one read per
        batch instead of one per cluster saves thousands of syscalls (or requests).
        """
        end = min(end, self.file_size)
        _window.w = (self.src, start, memoryview(self.src.read(start, max(0, end - start))))
        try:
            yield
        finally:
            _window.w = None

    def check(self, progress: ProgressFn | None = None) -> CheckReport:
        """Walk every table and decompress every compressed cluster."""
        report = CheckReport()
        for ext in self.extents():
            report.extents += 1
            if ext.kind is ExtentKind.COMPRESSED:
                self.decompress(ext)
                report.compressed_bytes += ext.length
                report.compressed_clusters += 1
            elif ext.kind is ExtentKind.DATA:
                if ext.host_offset + ext.length > self.file_size:
                    raise ImageMetadataError(f"data at guest offset {ext.offset} lies beyond EOF")
                report.data_bytes += ext.length
            else:
                report.zero_bytes += ext.length
            if progress:
                progress(ext.length)
        return report

    def allocated_bytes(self) -> int:
        """Guest bytes backed by data in the file (a metadata-only walk)."""
        return sum(e.length for e in self.extents() if e.kind is not ExtentKind.ZERO)

    def info(self) -> ImageInfo:
        return ImageInfo(
            format=self.format,
            subformat=self.subformat,
            virtual_size=self.virtual_size,
            file_size=self.file_size,
            cluster_size=self.cluster_size,
            compression=self.compression,
            checks=list(self.checks),
            details=dict(self.details),
        )

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def printable(text: str) -> str:
    """Text an image carries (a creator, snapshot or feature names) with its control
    characters escaped: shown by `inspect` or in a message, an escape sequence from the
    image would otherwise reach the operator's terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def require(condition: bool, reason: str, hint: str | None = None) -> None:
    """Refuse the image with a specific reason unless condition holds."""
    if not condition:
        raise ImageMetadataError(reason, hint=hint)


def check_virtual_size(size: int) -> None:
    require(size > 0, f"virtual size {size} is not positive")
    require(
        size <= MAX_VIRTUAL_SIZE,
        f"virtual size {size} exceeds the 64 TiB limit; the geometry is implausible",
    )


def merge_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Coalesce neighbouring ZERO extents, and DATA extents that are host-contiguous."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if pending is not None and pending.kind is ext.kind and pending.end == ext.offset:
            if ext.kind is ExtentKind.ZERO:
                pending = Extent(pending.offset, pending.length + ext.length, ExtentKind.ZERO)
                continue
            if (
                ext.kind is ExtentKind.DATA
                and pending.host_offset + pending.length == ext.host_offset
            ):
                pending = Extent(
                    pending.offset,
                    pending.length + ext.length,
                    ExtentKind.DATA,
                    pending.host_offset,
                )
                continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


class TableHints:
    """Keeps the source hinted a few tables ahead of a walk that reads `tables` in order.

    Why: scattered tables (a qcow2's L2 tables, a streamed VMDK's grain tables) were read
    one after another, and over S3 each waited its round trip in turn. `tables` are
    (offset, length) file ranges; one outside the file is not hinted (its read refuses it).
    """

    AHEAD = 8

    def __init__(self, image: DiskImage, tables: Sequence[tuple[int, int]]) -> None:
        self._src, self._size = image.src, image.file_size
        self._tables = tables
        self._next = 0
        for _ in range(self.AHEAD):
            self._hint_next()

    def reading(self) -> None:
        """Call as each table is read: the one AHEAD places on is hinted."""
        self._hint_next()

    def _hint_next(self) -> None:
        if self._next < len(self._tables):
            offset, length = self._tables[self._next]
            self._next += 1
            if offset >= 0 and offset + length <= self._size:
                prefetch(self._src, offset, length)
