"""A digest of a disk's guest content that costs time in its data, not its size.

sha256 over a whole disk would hash terabytes of zeros for a sparse 8 TiB image.
Instead the guest space is cut into aligned 64 KiB blocks; each non-zero block
yields a record `index (u64 LE) || xxh3_128(block)`. Blocks group into 64 MiB
segments; a segment with any non-zero block has the digest sha256(its records).
The content digest is sha256 over `segment (u64 LE) || segment digest` for those
segments, in order, then the virtual size. Zero blocks contribute nothing,
however they are stored, so the same guest content gives the same digest from
any format, and a re-read of the destination can be compared with it.

The block hash guards against corruption, not against an adversary (the image's
author already chooses every byte), so it is XXH3-128, as rsync uses for its
file checksums: ~7 GB/s on one core here against blake3's ~2.5 GB/s, and an
import hashes every data byte twice (written, then re-read). v1 used blake3.

Block hashes are computed by whichever thread holds the block (XXH3 keeps the GIL
for the ~9 us of a block; reads, decompression and writes release it). Finished
segment digests are small and can be saved, which is what
lets an interrupted import resume without re-reading what it already wrote, and
a re-read of a disk can be hashed segment by segment, in parallel or as soon as
each segment is written.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from rehost.malloc import tune_for_streaming

BLOCK = 64 * 1024
SEGMENT = 64 << 20
SEGMENT_BLOCKS = SEGMENT // BLOCK
RECORD = 24
ALGORITHM = "rehost-content-v2"
_ZERO_BLOCK = bytes(BLOCK)
READ_CHUNK = 4 << 20
"""Bytes per read when re-reading a disk."""
_LE64 = struct.Struct("<Q")


def block_records(
    offset: int, data: bytes | bytearray | memoryview, *, hashed: bool = True
) -> tuple[bytes, list[int]]:
    """Hash the non-zero blocks of `data`, which starts at a block-aligned guest offset.

    Returns the concatenated records and the in-buffer offsets of the zero blocks,
    so that callers can skip writing them. (The zero test is the zero block's
    `startswith` of the block's view, a memcmp in place: comparing a memoryview with
    bytes is ~60x slower, and copying it to compare ~2x.)
    """
    assert offset % BLOCK == 0, offset
    view = memoryview(data)
    records = bytearray()
    zeros: list[int] = []
    index = offset // BLOCK
    for start in range(0, len(data), BLOCK):
        block = view[start : start + BLOCK]
        if _ZERO_BLOCK.startswith(block):
            zeros.append(start)
        elif hashed:
            records += _LE64.pack(index) + xxhash.xxh3_128_digest(block)
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
        """Each segment's run of records goes to sha256 in one update, not one per block."""
        view = memoryview(records)
        pos, n = 0, len(records)
        while pos < n:
            segment = self._segment_at(records, pos)
            if segment != self._current:
                self._close_segment()
                self._current = segment
            end = n
            if self._segment_at(records, n - RECORD) != segment:  # a batch spans 1-2 segments
                end = pos + RECORD
                while self._segment_at(records, end) == segment:
                    end += RECORD
            self._h.update(view[pos:end])
            pos = end

    @staticmethod
    def _segment_at(records: bytes, pos: int) -> int:
        return int(_LE64.unpack_from(records, pos)[0]) // SEGMENT_BLOCKS

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

    def close(self) -> dict[int, str]:
        """Every segment digest, once all the records have been added."""
        self._close_segment()
        return self.segments

    def finish(self, virtual_size: int) -> str:
        return combine(self.close(), virtual_size)


def combine(segments: Mapping[int, str], virtual_size: int) -> str:
    """The content digest from the digests of the segments with data."""
    h = hashlib.sha256(ALGORITHM.encode())
    for segment in sorted(segments):
        h.update(_LE64.pack(segment) + bytes.fromhex(segments[segment]))
    h.update(_LE64.pack(virtual_size))
    return h.hexdigest()


Read = Callable[[int, int], bytes | bytearray]
"""`read(offset, length)`: exactly `length` bytes of the disk, fewer only at its end."""


def range_digests(
    read: Read,
    start: int,
    end: int,
    *,
    skip: Callable[[int, int], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, str]:
    """Re-read [start, end) through `read` and return the digests of its segments with data.

    `start` is on a segment boundary and `end` is one or the end of the disk, so the
    result is final for those segments. `skip(offset, end)` may say that a chunk lies
    wholly in a hole (which reads as zeros, and zeros count for nothing) so it need not
    be read; `progress(n)` is told of every chunk done, read or skipped.
    """
    assert start % SEGMENT == 0, start
    content = ContentDigest()
    for offset in range(start, end, READ_CHUNK):
        n = min(READ_CHUNK, end - offset)
        if skip is None or not skip(offset, offset + n):
            data = read(offset, n)
            if len(data) != n:
                raise OSError(f"short read at {offset}: {len(data)} of {n} bytes")
            content.add(block_records(offset, data)[0])
        if progress is not None:
            progress(n)
    return content.close()


def read_digest(read: Read, size: int, workers: int = 4) -> str:
    """Re-read `size` bytes through `read(offset, length)` and return their content digest.

    Segments are hashed in parallel, one per worker at a time.
    """
    tune_for_streaming()
    segments: dict[int, str] = {}
    pending: deque[Future[dict[int, str]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        for start in range(0, size, SEGMENT):
            pending.append(pool.submit(range_digests, read, start, min(start + SEGMENT, size)))
            if len(pending) >= 2 * workers:
                segments.update(pending.popleft().result())
        while pending:
            segments.update(pending.popleft().result())
    return combine(segments, size)
