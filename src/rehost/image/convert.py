"""Extents → destination disk, in parallel, hashing the guest content as it goes.

The main thread walks the extents and cuts them into batches of whole 64 KiB
digest blocks; a thread pool reads, decompresses, hashes and writes each batch
(pread, isal/zstd and hashlib all release the GIL); results are combined in
guest order. Bytes in flight are bounded by the window of pending batches, and
large zero extents are never read: they are skipped on a disk known to be zero
or zeroed with one call otherwise.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

from rehost.blob.source import prefetch
from rehost.disk.target import Disk
from rehost.errors import ImageVerificationError
from rehost.image.base import DiskImage, Extent, ExtentKind, ProgressFn
from rehost.image.digest import BLOCK, SEGMENT, ContentDigest, block_records
from rehost.malloc import tune_for_streaming

BATCH_BYTES = 4 << 20
"""Guest bytes per batch: large enough to amortise Python's overhead per call."""


@dataclass
class ConvertResult:
    virtual_size: int
    data_bytes: int
    """Guest bytes that were read from DATA and COMPRESSED extents."""
    zero_bytes: int
    written_bytes: int
    """Bytes actually written to the disk (all-zero blocks are skipped or zeroed)."""
    digest: str
    elapsed: float

    @property
    def rate(self) -> float:
        return self.virtual_size / self.elapsed if self.elapsed > 0 else 0.0


SCATTERED_RUN = 1 << 20
"""Data runs shorter than this are hinted to the source ahead of their batch."""
SURVEY_KEEP = 1 << 18
"""Extents kept from the survey for the write pass (~30 MiB at most); more are re-walked."""
WINDOW_MAX = 32 << 20


@dataclass
class Survey:
    data_bytes: int = 0
    zero_bytes: int = 0
    extents: int = 0
    kept: list[Extent] | None = None
    """All the extents, when there were few enough to keep, so they need not be walked again."""


def survey(image: DiskImage) -> Survey:
    """Walk the metadata once, so a corrupt table fails before anything is written."""
    s = Survey(kept=[])
    for ext in image.extents():
        s.extents += 1
        if ext.kind is ExtentKind.ZERO:
            s.zero_bytes += ext.length
        else:
            s.data_bytes += ext.length
        if s.kept is not None:
            s.kept.append(ext)
            if len(s.kept) > SURVEY_KEEP:
                s.kept = None
    return s


def require_capacity(image: DiskImage, disk: Disk) -> None:
    if disk.size < image.virtual_size:
        raise ImageVerificationError(
            f"{disk.path} holds {disk.size} bytes but the image's virtual size is "
            f"{image.virtual_size} bytes ({image.virtual_size - disk.size} bytes short)"
        )


def _extents_from(image: DiskImage, start: int, kept: list[Extent] | None) -> Iterator[Extent]:
    """The image's extents from guest offset `start` (a segment boundary) on."""
    for ext in kept if kept is not None else image.extents():
        if ext.offset >= start:
            yield ext
        elif ext.offset + ext.length > start:
            yield ext.cut(start, ext.offset + ext.length)


def _batches(
    image: DiskImage, start: int, kept: list[Extent] | None = None
) -> Iterator[tuple[int, list[Extent]] | Extent]:
    """Yield (start, extents) batches, or a bare ZERO extent of whole blocks to skip.

    A batch always starts on a 64 KiB block boundary and ends on one (or at the end
    of the disk), so each batch hashes whole digest blocks on its own.
    """
    batch: list[Extent] = []
    for ext in _extents_from(image, start, kept):
        if ext.kind is ExtentKind.ZERO:
            inner_start = -(-ext.offset // BLOCK) * BLOCK
            inner_end = ext.end // BLOCK * BLOCK
            if inner_end - inner_start >= BLOCK:
                if inner_start > ext.offset:
                    batch.append(ext.cut(ext.offset, inner_start))
                if batch:
                    yield start, batch
                    batch = []
                yield ext.cut(inner_start, inner_end)
                if inner_end < ext.end:
                    start = inner_end
                    batch.append(ext.cut(inner_end, ext.end))
                continue
        pos = ext.offset
        while pos < ext.end:
            if not batch:
                start = pos
            end = min(ext.end, start + BATCH_BYTES) if ext.kind is ExtentKind.DATA else ext.end
            batch.append(ext.cut(pos, end))
            pos = end
            if end - start >= BATCH_BYTES and end % BLOCK == 0:
                yield start, batch
                batch = []
    if batch:
        yield start, batch


def _compressed_span(batch: list[Extent]) -> tuple[int, int] | None:
    """The file range holding a batch's compressed clusters, if reading it whole pays."""
    packed = [e for e in batch if e.kind is ExtentKind.COMPRESSED]
    if len(packed) < 2:
        return None
    lo = max(0, min(e.host_offset for e in packed) - 512)  # room for VMDK grain markers
    hi = max(e.host_offset + e.host_length for e in packed)
    budget = min(WINDOW_MAX, 2 * sum(e.host_length for e in packed) + (1 << 20))
    return (lo, hi) if hi - lo <= budget else None


def _hint(image: DiskImage, batch: list[Extent], window: tuple[int, int] | None) -> None:
    """Tell the source what a queued batch will read, so that a fragmented image's scattered
    runs are fetched several at once, not one round trip after another per worker.

    Only short runs: long ones are what the source's read-ahead streams serve best.
    """
    if window:
        prefetch(image.src, window[0], window[1] - window[0])
    for ext in batch:
        if ext.kind is ExtentKind.DATA and ext.length < SCATTERED_RUN:
            prefetch(image.src, ext.host_offset, ext.length)


def _whole_blocks(
    start: int, parts: list[bytes | memoryview]
) -> Iterator[tuple[int, bytes | memoryview]]:
    """Cut a batch's parts into buffers of whole blocks, each on a block boundary.

    Only a block that spans parts is joined (copied); the whole blocks inside a part
    are hashed and written from the part itself. The last buffer may end where the
    batch does.
    """
    carry: list[bytes | memoryview] = []
    """The pieces so far of a block that spans parts."""
    carried = 0
    for part in parts:
        n, i = len(part), 0
        if carried:
            i = min(BLOCK - carried, n)
            carry.append(memoryview(part)[:i])
            carried += i
            if carried < BLOCK:
                continue
            yield start, b"".join(carry)
            start += carried
            carry, carried = [], 0
        whole = (n - i) // BLOCK * BLOCK
        if whole:
            yield start, part if whole == n else memoryview(part)[i : i + whole]
            start += whole
            i += whole
        if i < n:
            carry, carried = [memoryview(part)[i:]], n - i
    if carry:
        yield start, b"".join(carry)


class _Runs:
    """Coalesces a batch's blocks: one (gather) write per run of data, one zero() per run
    of zero blocks, which a disk known to be zero skips."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.written = 0
        self._at = self._length = 0
        self._data: list[memoryview] | None = None
        """The pending run's buffers, or None for a run of zeros."""

    def add(self, offset: int, length: int, data: memoryview | None) -> None:
        if (
            self._length
            and self._at + self._length == offset
            and (data is None) == (self._data is None)
        ):
            self._length += length
        else:
            self.flush()
            self._at, self._length = offset, length
            self._data = None if data is None else []
        if data is not None:
            assert self._data is not None
            self._data.append(data)

    def flush(self) -> None:
        if not self._length:
            return
        if self._data is None:
            self.disk.zero(self._at, self._length)
        else:
            self.disk.write(self._at, *self._data)
            self.written += self._length
        self._length = 0


def _run_batch(
    image: DiskImage,
    disk: Disk,
    start: int,
    batch: list[Extent],
    window: tuple[int, int] | None,
    hashed: bool,
) -> tuple[bytes, int]:
    """Read, hash and write one batch (`window`: its `_compressed_span`); return its digest
    records and bytes written."""
    with image.host_window(*window) if window else nullcontext():
        parts = [part for ext in batch for part in image.read_parts(ext)]
    records: list[bytes] = []
    runs = _Runs(disk)
    for offset, buf in _whole_blocks(start, parts):
        recs, zero_blocks = block_records(offset, buf, hashed=hashed)
        records.append(recs)
        # Maximal runs of zero or non-zero blocks.
        zero_set = set(zero_blocks)
        view = memoryview(buf)
        pos, n = 0, len(buf)
        while pos < n:
            is_zero = pos in zero_set
            end = pos
            while end < n and (end in zero_set) == is_zero:
                end += BLOCK
            end = min(end, n)
            runs.add(offset + pos, end - pos, None if is_zero else view[pos:end])
            pos = end
    runs.flush()
    return b"".join(records), runs.written


Checkpoint = Callable[[int, dict[int, str]], None]
"""Called with a guest offset below which everything is written and flushed, and the
finished segment digests up to it: enough to resume from there."""


def convert(
    image: DiskImage,
    disk: Disk,
    *,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    resume_from: int = 0,
    segments: dict[int, str] | None = None,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = SEGMENT,
    digest: bool = True,
    plan: Survey | None = None,
) -> ConvertResult:
    """Write the image's guest bytes onto the disk and return their content digest.

    To resume, pass a `resume_from` offset and the `segments` that a `checkpoint`
    call reported for it; only the rest of the image is then read and written.
    With `digest=False` the guest bytes are not hashed (the result's digest is "").
    A caller that already surveyed the image passes its `plan`, so the metadata is not
    walked (or fetched) twice.
    """
    if resume_from % SEGMENT or checkpoint_every % SEGMENT:
        raise ValueError("resume points and checkpoints fall on segment boundaries")
    tune_for_streaming()
    began = time.monotonic()
    require_capacity(image, disk)
    plan = plan or survey(image)
    workers = workers or max(2, min(8, os.cpu_count() or 2))  # more only adds GIL contention
    content = ContentDigest(segments)
    written = 0
    done = resume_from
    next_checkpoint = resume_from + checkpoint_every
    pending: deque[tuple[int, Future[tuple[bytes, int]] | None]] = deque()

    def advance(end: int, fut: Future[tuple[bytes, int]] | None) -> None:
        nonlocal written, done, next_checkpoint
        if fut is not None:
            records, n = fut.result()
            content.add(records)
            written += n
        if progress:
            progress(end - done)
        done = end
        if checkpoint and done >= next_checkpoint and done < image.virtual_size:
            mark = done // checkpoint_every * checkpoint_every
            disk.flush()  # the data is durable before the checkpoint that names it
            checkpoint(mark, content.finished_before(mark))
            next_checkpoint = mark + checkpoint_every

    with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
        try:
            for item in _batches(image, resume_from, plan.kept):
                if isinstance(item, Extent):
                    disk.zero(item.offset, item.length)
                    pending.append((item.end, None))
                else:
                    start, batch = item
                    window = _compressed_span(batch)
                    _hint(image, batch, window)
                    fut = pool.submit(_run_batch, image, disk, start, batch, window, digest)
                    pending.append((batch[-1].end, fut))
                while pending and (len(pending) >= workers * 2 or pending[0][1] is None):
                    advance(*pending.popleft())
            while pending:
                advance(*pending.popleft())
        except BaseException:
            for _, queued in pending:
                if queued is not None:
                    queued.cancel()
            raise
    disk.flush()
    return ConvertResult(
        virtual_size=image.virtual_size,
        data_bytes=plan.data_bytes,
        zero_bytes=plan.zero_bytes,
        written_bytes=written,
        digest=content.finish(image.virtual_size) if digest else "",
        elapsed=time.monotonic() - began,
    )
