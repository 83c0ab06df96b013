"""A digest of a disk's guest content that costs time in its data, not its size.

sha256 over a whole disk would hash terabytes of zeros for a sparse 8 TiB image.
Instead the guest space is cut into aligned 64 KiB blocks; each non-zero block
yields a record `index (u64 LE) || blake3(block)` (blake3: ~4x sha256's speed here). Blocks group into 64 MiB
segments; a segment with any non-zero block has the digest sha256(its records).
The content digest is sha256 over `segment (u64 LE) || segment digest` for those
segments, in order, then the virtual size. Zero blocks contribute nothing,
however they are stored, so the same guest content gives the same digest from
any format, and a re-read of the destination can be compared with it.

Block hashes are computed by whichever thread holds the block (hashlib releases
the GIL). Finished segment digests are small and can be saved, which is what
lets an interrupted import resume without re-reading what it already wrote.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from blake3 import blake3

from rehost.malloc import tune_for_streaming

BLOCK = 64 * 1024
SEGMENT = 64 << 20
SEGMENT_BLOCKS = SEGMENT // BLOCK
RECORD = 40
ALGORITHM = "rehost-content-v1"
_ZERO_BLOCK = bytes(BLOCK)
_LE64 = struct.Struct("<Q")


def block_records(offset: int, data: bytes, *, hashed: bool = True) -> tuple[bytes, list[int]]:
    """Hash the non-zero blocks of `data`, which starts at a block-aligned guest offset.

    Returns the concatenated records and the in-buffer offsets of the zero blocks,
    so that callers can skip writing them. (The zero test is `bytes.startswith` at an
    offset, a memcmp in place: comparing a memoryview with bytes is ~60x slower.)
    """
    assert offset % BLOCK == 0, offset
    view = memoryview(data)
    records = bytearray()
    zeros: list[int] = []
    index = offset // BLOCK
    for start in range(0, len(data), BLOCK):
        if data.startswith(_ZERO_BLOCK[: min(BLOCK, len(data) - start)], start):
            zeros.append(start)
        elif hashed:
            records += _LE64.pack(index) + blake3(view[start : start + BLOCK]).digest()
        index += 1
    return bytes(records), zeros


class ContentDigest:
    """Combines block records, which must arrive in guest order."""

    def __init__(self, segments: dict[int, str] | None = None) -> None:
        self.segments: dict[int, str] = dict(segments or {})
        """Digests of finished segments with data, by segment index; safe to persist."""
        self._current = -1
        self._h = hashlib.sha256()

    def add(self, records: bytes) -> None:
        for pos in range(0, len(records), RECORD):
            segment = _LE64.unpack_from(records, pos)[0] // SEGMENT_BLOCKS
            if segment != self._current:
                self._close_segment()
                self._current = segment
            self._h.update(records[pos : pos + RECORD])

    def _close_segment(self) -> None:
        if self._current >= 0:
            self.segments[self._current] = self._h.hexdigest()
            self._h = hashlib.sha256()
        self._current = -1

    def finished_before(self, offset: int) -> dict[int, str]:
        """The segment digests that are final once everything before `offset` has been added."""
        limit = offset // SEGMENT
        if 0 <= self._current < limit:
            self._close_segment()
        return {k: v for k, v in self.segments.items() if k < limit}

    def finish(self, virtual_size: int) -> str:
        self._close_segment()
        h = hashlib.sha256(ALGORITHM.encode())
        for segment in sorted(self.segments):
            h.update(_LE64.pack(segment) + bytes.fromhex(self.segments[segment]))
        h.update(_LE64.pack(virtual_size))
        return h.hexdigest()


def read_digest(
    read: Callable[[int, int], bytes],
    size: int,
    workers: int = 4,
    data_runs: Iterable[tuple[int, int, bool]] | None = None,
) -> str:
    """Re-read `size` bytes through `read(offset, length)` and return their content digest.

    `data_runs` ((start, end, has_data) in order, e.g. a sparse file's SEEK_DATA map)
    lets chunks that lie wholly in holes be skipped: a hole reads as zeros, which the
    digest leaves out anyway.
    """
    tune_for_streaming()
    digest = ContentDigest()
    chunk = 4 << 20
    holes = _HoleIndex(data_runs)

    def one(offset: int) -> bytes:
        data = read(offset, min(chunk, size - offset))
        if len(data) != min(chunk, size - offset):
            raise OSError(f"short read at {offset}: {len(data)} bytes")
        return block_records(offset, data)[0]

    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        for offset in range(0, size, chunk):
            if holes.covers(offset, min(offset + chunk, size)):
                continue
            pending.append(pool.submit(one, offset))
            if len(pending) >= 2 * workers:
                digest.add(pending.popleft().result())
        while pending:
            digest.add(pending.popleft().result())
    return digest.finish(size)


class _HoleIndex:
    """Answers "is [start, end) entirely a hole?" from a file's allocation runs."""

    def __init__(self, runs: Iterable[tuple[int, int, bool]] | None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end, has_data in runs or ():
            if not has_data:
                self._starts.append(start)
                self._ends.append(end)

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end
