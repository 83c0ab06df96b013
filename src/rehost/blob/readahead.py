"""Shared machinery of the remote byte sources: a bounded read-ahead block cache and retries.

Why read-ahead: the image converter reads with several threads in roughly
increasing order, in pieces from a few KiB (compressed clusters, tables) to
4 MiB (data runs). Sent one by one to object storage, each piece would pay a
full round trip, and small pieces would be dominated by per-request overhead.
So the object is cached in aligned chunks (4 MiB by default) that serve many
reads, and once the reads look like a stream the next chunks are fetched ahead
of the readers, several requests in flight to keep the link busy. A read
continues a stream when it lands within 32 MiB of where recent reads
reached (threads arrive slightly out of order); the read-ahead depth grows with
the bytes the stream has consumed (one chunk once it has read an eighth of a
chunk, up to `readahead` chunks). Reads that do not look like a stream
(headers, tables scattered across the file) fetch only small aligned blocks
(256 KiB) and prefetch nothing, so metadata lookups never pull whole chunks
they do not need.

Why read-ahead requests span several chunks (64 MiB, aligned): the store and
botocore (~2 ms of CPU) pay per request. On the benchmark's 2 cores SeaweedFS
spent 6.3 CPU-seconds serving 2 GiB in 4 MiB ranges, ~3 in 32 MiB ones, and
0.12 less again in 64 MiB ones (128 MiB saved no more). Why chunks stay
smaller: each is read from the body as its own `bytes` and handed to its
readers as soon as it has arrived, so a read of a whole chunk (a raw image's
4 MiB runs) is served without a copy and without waiting for the rest of its
request, a request cut midway is retried from its first chunk not yet
delivered, and consumed chunks are evicted one by one.

Memory is bounded whatever the object size: the cache holds at most
`cache_bytes` (chunks still downloading count too) and evicts the least
recently used finished entry; read-ahead that finds no room is skipped, and a
demand read that finds no room is fetched without being cached. Concurrent
readers of one chunk wait for a single fetch rather than fetching it twice.

Why retries live here: a migration streams gigabytes over minutes to hours,
through links and servers that have bad moments (a 503, a reset connection, a
store restarting). Transient faults are retried with exponential backoff and
jitter for a bounded time; permanent ones (403, 404, a changed object) are
raised at once as typed errors by the concrete source. A source given a
`deadline` (the import's --timeout) sends no request and sleeps no backoff past
it: it raises TaskTimeout instead.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from rehost.errors import SourceUnavailable, SystemError_, TaskTimeout

MiB = 1 << 20
DEFAULT_CHUNK = 4 * MiB
DEFAULT_REQUEST = 64 * MiB
DEFAULT_READAHEAD = 8
DEFAULT_CACHE = 136 * MiB
"""Room for two requests in flight and the chunks being read (an import's peak RSS ~200 MiB)."""
SMALL_BLOCK = 256 << 10
"""Granularity of reads that do not (yet) look sequential."""
PREFETCH_PARALLEL = 8
"""Requests `prefetch` may have in flight: scattered tables are small, latency is the cost."""
MAX_STREAMS = 8
DENSE = 4
"""A stream is served by whole chunks only while it reads at least 1/DENSE of its span..."""
DENSITY_SPAN = 64 * MiB
"""...judged over about its last DENSITY_SPAN bytes, so that it can change its mind."""
ACTIVE_READS = 64
"""A stream served by chunks, read within the last ACTIVE_READS reads, shares the cache."""
NEAR = 32 * MiB
"""A read continues a stream when it lands within NEAR of where the stream's reads reached."""

T = TypeVar("T")


class Transient(Exception):
    """A fault worth retrying: a 5xx, a reset or refused connection, a timeout, a short body.

    `retry_after`: the seconds the server asked to be left alone for (Retry-After), if any.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by both attempts and total time.

    The defaults ride out a store restart of tens of seconds (delays of about
    0.25, 0.5, 1, 2, 4, 8, 10 s, each jittered down by up to half).
    """

    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 10.0
    deadline: float = 60.0
    """Give up rather than sleep past this many seconds after the first failure.

    Counted from the first failure, not the first attempt: a slow body that breaks after
    minutes of progress deserves its retries as much as a request refused at once."""

    def delay(self, failures: int) -> float:
        d = min(self.max_delay, self.base_delay * 2.0 ** (failures - 1))
        return d / 2 + random.uniform(0, d / 2)

    def run(
        self,
        fn: Callable[[], T],
        what: str,
        *,
        sleep: Callable[[float], bool] | None = None,
        on_retry: Callable[[Transient], None] | None = None,
    ) -> T:
        """Call `fn` until it returns, raises a non-`Transient` error, or the budget is spent.

        `sleep(seconds)` returns True when the wait was cut short (the source was closed).
        A server's Retry-After is waited for, within `max_delay`.
        """
        first_failure: float | None = None
        failures = 0
        while True:
            try:
                return fn()
            except Transient as e:
                failures += 1
                if first_failure is None:
                    first_failure = time.monotonic()
                elapsed = time.monotonic() - first_failure
                pause = self.delay(failures)
                if e.retry_after is not None:
                    pause = max(pause, min(e.retry_after, self.max_delay))
                if failures >= self.attempts or elapsed + pause > self.deadline:
                    raise SourceUnavailable(
                        f"{what}: gave up after {failures} attempts, {elapsed:.1f}s after the first "
                        f"failure; "
                        f"last error: {e}"
                    ) from None
                if on_retry:
                    on_retry(e)
                if sleep is not None:
                    if sleep(pause):
                        raise SystemError_(f"{what}: the source was closed") from None
                else:
                    time.sleep(pause)


@dataclass
class _Entry:
    start: int
    size: int
    future: Future[bytes]
    read: bool = False
    """Whether a read has used it: read-ahead makes room only by evicting such entries."""


@dataclass
class _Stream:
    frontier: int
    consumed: int
    origin: int
    """Where the span that `consumed` was read from begins."""
    last: int
    """The read (by count) that last continued it."""

    def dense(self) -> bool:
        """Whether the stream reads most of what it passes over, as a file copy does.

        A fragmented image read in guest order jumps through the file: its reads stay
        near one another, but whole chunks fetched for them would be mostly waste (a
        qcow2 whose guest-adjacent clusters lie 4 MiB apart fetched 68 times its size).
        """
        return self.consumed * DENSE >= self.frontier - self.origin


def _resolve(fut: Future[bytes], data: bytes | None, exc: BaseException | None) -> None:
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            assert data is not None
            fut.set_result(data)
    except InvalidStateError:  # already failed by close()
        pass


class ReadAheadSource:
    """A `RangeSource` over a remote object, given `_fetch(start, sizes, deliver)` by a subclass.

    The subclass sets `self._size` and `self._name` before using the cache, implements
    `_fetch` as a single request for the `sum(sizes)` bytes at `start` that hands them to
    `deliver` as consecutive pieces of those sizes, each as soon as it is read from the
    body (so no piece is a copy, and readers start on the first chunk of a request while
    the rest arrives), or raises `Transient` (retried from the first piece not delivered)
    or a `RehostError` (raised to the reader); and it calls `_count_request` for every
    request and reads bodies with `_read_body` (or calls `_count_bytes` for each piece).
    `request_size` caps the bytes of one read-ahead request.

    Counters: `bytes_fetched` (body bytes received, read-ahead included),
    `requests` (every request sent, retries and the open probe included) and
    `retries`. Cache state: `cache_bytes` (now), `peak_cache_bytes` and `cache_limit`.
    """

    _size: int
    _name: str

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        readahead: int = DEFAULT_READAHEAD,
        cache_bytes: int = DEFAULT_CACHE,
        request_size: int = DEFAULT_REQUEST,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
    ) -> None:
        if chunk_size <= 0 or readahead < 0:
            raise ValueError("chunk_size must be positive and readahead not negative")
        if cache_bytes < 2 * chunk_size:
            raise ValueError(f"cache_bytes must hold at least two chunks of {chunk_size} bytes")
        self.chunk_size = chunk_size
        # Leave room for the chunks being read while the next ones are prefetched, and for
        # a prefetch that is rounded up to a whole request.
        room = cache_bytes // chunk_size - 2
        self._group = max(1, min(request_size // chunk_size, room // 2))
        """Chunks per read-ahead request; requests start on a multiple of it."""
        self.readahead = min(readahead, room - (self._group - 1))
        self._near = min(NEAR, chunk_size * self._group)
        """Not the whole request: a sweep that restarts a request's length back (a qcow2
        whose adjacent clusters lie 2 MiB apart, read row by row) is a new stream, not a
        dense one that should be fetched again in whole chunks."""
        self.cache_limit = cache_bytes
        self.retry = retry or RetryPolicy()
        self.deadline = deadline
        """A `time.monotonic()` past which nothing is sent or waited for (the import's timeout)."""
        self._small = min(SMALL_BLOCK, chunk_size)
        self._ramp = max(self._small, chunk_size // 8)
        """Bytes a stream must have consumed before it is served by whole chunks."""
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self._stream_ids = 0
        self._closed = threading.Event()
        in_flight = -(-(self.readahead + self._group - 1) // self._group)
        self._pool = ThreadPoolExecutor(
            max(in_flight, PREFETCH_PARALLEL), thread_name_prefix="readahead"
        )
        self.cache_bytes = 0
        self._reads = 0
        self.peak_cache_bytes = 0
        self.bytes_fetched = 0
        self.requests = 0
        self.retries = 0

    # -- what subclasses implement and call ----------------------------------------

    def _fetch(self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]) -> None:
        raise NotImplementedError

    def _count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n

    def _read_body(
        self, read: Callable[[int], bytes], sizes: Sequence[int], deliver: Callable[[bytes], None]
    ) -> None:
        """A response body, by `read(n)`, as pieces of `sizes`: each counted and delivered
        as soon as it is read."""
        for n in sizes:
            piece = read(n)
            self._count_bytes(len(piece))
            deliver(piece)

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        def attempt() -> T:
            if self.time_left() == 0.0:
                raise TaskTimeout(f"{what}: the import's timeout ran out while reading the source")
            return fn()

        return self.retry.run(attempt, what, sleep=self._pause, on_retry=self._count_retry)

    def _pause(self, seconds: float) -> bool:
        """Sleep between retries, waking at close (True) or at the deadline."""
        left = self.time_left()
        return self._closed.wait(seconds if left is None else min(seconds, left))

    def time_left(self) -> float | None:
        """Seconds until the deadline (0.0 once past it), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def _count_retry(self, _: Transient) -> None:
        with self._lock:
            self.retries += 1

    # -- RangeSource ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        parts = self._pieces(offset, length, keep_views=True)
        first = parts[0] if parts else b""
        return first if len(parts) == 1 and isinstance(first, bytes) else b"".join(parts)

    def read_parts(self, offset: int, length: int) -> list[bytes | memoryview]:
        """What `read` returns, as the cached pieces that hold it (uncopied) or copies.

        A piece under a quarter of its entry is copied: a view keeps the whole chunk alive,
        and a batch of scattered small reads would otherwise hold one chunk per read. So
        what the pieces keep alive stays within four times the bytes read. (Not half: a
        vhd's 2 MiB blocks lie 512 bytes apart, so every other one spans two 4 MiB chunks
        as a piece just under half of one, and half the image was copied.)
        """
        return self._pieces(offset, length, keep_views=False)

    def _pieces(self, offset: int, length: int, *, keep_views: bool) -> list[bytes | memoryview]:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        if self._closed.is_set():
            raise SystemError_(f"{self._name}: read after close")
        end = min(offset + length, self._size)
        if offset >= end:
            return []
        consumed = self._note_stream(offset, end)
        chunky = consumed >= self._ramp
        if chunky:
            # The rest of this read and, for a stream, the chunks after it, in parallel.
            depth = min(self.readahead, 1 + consumed // self.chunk_size)
            C = self.chunk_size
            self._prefetch(range(offset // C + 1, (end - 1) // C + 1 + depth))
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            start, fut = self._locate(pos, end, chunky)
            data = fut.result()
            lo, hi = pos - start, min(end - start, len(data))
            if lo == 0 and hi == len(data):
                parts.append(data)
            elif keep_views or 4 * (hi - lo) >= len(data):
                parts.append(memoryview(data)[lo:hi])
            else:
                parts.append(data[lo:hi])
            pos = start + hi
        return parts

    def prefetch(self, offset: int, length: int) -> None:
        """Start fetching [offset, offset + length) for a read that will come soon.

        Image tables (a qcow2's L2 tables) and a fragmented image's data runs lie
        scattered through the file; hinted ahead, several are in flight at once instead
        of one round trip after another. What is cached, what a chunk-served stream is
        about to read ahead anyway, and what finds no room in the cache is left alone.
        """
        end = min(offset + length, self._size)
        if offset < 0 or offset >= end:
            return
        C, S = self.chunk_size, self._small
        jobs: list[list[tuple[tuple[int, int], _Entry]]] = [[]]
        with self._lock:
            if self._closed.is_set() or any(
                self._chunk_served(s) and abs(offset - s.frontier) <= C * self._group
                for s in self._streams.values()
            ):
                return
            for b in range(offset // S, -(-end // S)):
                start = b * S
                if (0, b) in self._entries or (1, start // C) in self._entries:
                    jobs.append([])  # a request covers contiguous missing blocks only
                    continue
                e = _Entry(start, min(S, self._size - start), Future())
                if not self._reserve((0, b), e):
                    break
                jobs[-1].append(((0, b), e))
        self._submit([job for job in jobs if job])

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self.cache_bytes = 0
        closed = SystemError_(f"{self._name}: the source was closed")
        for e in entries:
            _resolve(e.future, None, closed)  # wake anyone waiting on a cancelled prefetch

    def __enter__(self) -> ReadAheadSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the cache ------------------------------------------------------------------

    def _note_stream(self, offset: int, end: int) -> int:
        """Bytes consumed by the stream this read continues (or starts); 0 if it is sparse.

        A read continues a stream when it starts within `_near` of the stream's
        frontier, before or after it: threads reading in roughly increasing order
        arrive slightly out of order.
        """

        def near(s: _Stream) -> bool:
            return abs(offset - s.frontier) <= self._near

        with self._lock:
            self._reads += 1
            # The latest near one: a copy that reaches where the file's end was probed
            # continues the copy, and a sweep through the file its latest pass.
            sid = next((k for k, s in reversed(self._streams.items()) if near(s)), None)
            if sid is not None:
                s = self._streams[sid]
                s.last = self._reads
                s.frontier = max(s.frontier, end)
                s.origin = min(s.origin, offset)
                s.consumed += end - offset
                if s.frontier - s.origin > DENSITY_SPAN:  # keep the recent half
                    s.origin = s.frontier - DENSITY_SPAN // 2
                    s.consumed //= 2
                self._streams.move_to_end(sid)
                return s.consumed if s.dense() else 0
            self._stream_ids += 1
            self._streams[self._stream_ids] = _Stream(end, end - offset, offset, self._reads)
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
            return end - offset

    def _lookup(self, key: tuple[int, int]) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            e.read = True
        return e

    def _drop(self, key: tuple[int, int]) -> None:
        self.cache_bytes -= self._entries.pop(key).size

    def _chunk_served(self, s: _Stream) -> bool:
        return s.consumed >= self._ramp and s.dense()

    def _ahead_limit(self) -> int:
        """Unread read-ahead the cache may hold: all of it for one stream, a third when
        streams take turns, so that each (up to MAX_STREAMS) keeps room for the chunk it
        is reading."""
        active = sum(
            self._reads - s.last <= ACTIVE_READS and self._chunk_served(s)
            for s in self._streams.values()
        )
        return self.cache_limit if active <= 1 else self.cache_limit // 3

    def _reserve(self, key: tuple[int, int], entry: _Entry, *, ahead: bool = True) -> bool:
        """Insert an entry, evicting finished ones least recently used; False if no room.

        Read-ahead (`ahead`) is held to `_ahead_limit()` unread, and room is made by
        evicting what reads have used before what they have not. Otherwise streams that
        read in turn (a fragmented image's interleaved runs) evict each other's read-ahead
        before it is read, and everything is fetched again and again.
        """
        if ahead:
            waiting = sum(e.size for e in self._entries.values() if not e.read)
            if waiting + entry.size > self._ahead_limit():
                return False
        while self.cache_bytes + entry.size > self.cache_limit:
            victim = unread = None
            for k, e in self._entries.items():
                if e.future.done():
                    if e.read:
                        victim = k
                        break
                    unread = unread or k
            victim = victim or (None if ahead else unread)
            if victim is None:
                return False
            self._drop(victim)
        self._entries[key] = entry
        self.cache_bytes += entry.size
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        return True

    def _locate(self, pos: int, end: int, chunky: bool) -> tuple[int, Future[bytes]]:
        """The (start, future) of a cache entry holding `pos`, fetching it if missing."""
        C, S = self.chunk_size, self._small
        with self._lock:
            hit = self._lookup((1, pos // C)) or self._lookup((0, pos // S))
            if hit is not None:
                return hit.start, hit.future
            if chunky:
                start = pos // C * C
                size = min(C, self._size - start)
                items = [((1, pos // C), _Entry(start, size, Future(), read=True))]
            else:
                # Small blocks from pos up to the end of the read, as one request.
                items = []
                b = pos // S
                while b * S < end and (not items or self._entries.get((0, b)) is None):
                    start = b * S
                    e = _Entry(start, min(S, self._size - start), Future(), read=True)
                    items.append(((0, b), e))
                    b += 1
            cached = [(k, e) for k, e in items if self._reserve(k, e, ahead=False)]
        self._fill(items, cached)
        return items[0][1].start, items[0][1].future

    def _prefetch(self, chunks: range) -> None:
        """Fetch the missing chunks of every request-sized group that `chunks` touches."""
        C, G = self.chunk_size, self._group
        jobs: list[list[tuple[tuple[int, int], _Entry]]] = [[]]
        with self._lock:
            if self._closed.is_set():
                return
            for ci in range(chunks.start, -(-chunks.stop // G) * G):
                start = ci * C
                if start >= self._size:
                    break
                if ci % G == 0 or (1, ci) in self._entries:
                    jobs.append([])  # a request covers one group, and no cached chunk
                if (1, ci) in self._entries:
                    # Still wanted: keep it from looking old. Read-ahead that was never
                    # read would otherwise be the first evicted.
                    self._entries.move_to_end((1, ci))
                    continue
                e = _Entry(start, min(C, self._size - start), Future())
                if not self._reserve((1, ci), e):
                    break
                jobs[-1].append(((1, ci), e))
        self._submit([job for job in jobs if job])

    def _submit(self, jobs: list[list[tuple[tuple[int, int], _Entry]]]) -> None:
        """Fetch each job's reserved entries in the pool, one request per job."""
        for job in jobs:
            try:
                self._pool.submit(self._fill, job, job)
            except RuntimeError:  # closed meanwhile
                self._fill_failed(job, job, SystemError_(f"{self._name}: the source was closed"))

    def _fill(
        self,
        items: list[tuple[tuple[int, int], _Entry]],
        cached: list[tuple[tuple[int, int], _Entry]],
    ) -> None:
        """Fetch the contiguous entries `items` with one request (with retries), resolving
        each as its bytes arrive; a retry asks only for the entries not yet resolved."""
        done = 0
        short = False

        def deliver(piece: bytes) -> None:
            nonlocal done, short
            key, e = items[done]
            if short or len(piece) != e.size:
                short = True  # the body ended early: what follows is not where it belongs
                return
            _resolve(e.future, piece, None)
            done += 1
            if key[0] == 1:
                self._drop_small_blocks_in(key[1])

        def attempt() -> None:
            nonlocal short
            if done == len(items):  # a fault after the last piece leaves nothing to fetch
                return
            if self._closed.is_set():
                raise SystemError_(f"{self._name}: the source was closed")
            short = False
            at = items[done][1].start
            self._fetch(at, [e.size for _, e in items[done:]], deliver)
            if done < len(items):
                want = sum(e.size for _, e in items[done:])
                raise Transient(f"short read: the body ended before {want} bytes at offset {at}")

        first, last = items[0][1], items[-1][1]
        try:
            self._retrying(
                attempt, f"{self._name}: bytes {first.start}-{last.start + last.size - 1}"
            )
        except BaseException as exc:  # what was delivered stays cached
            self._fill_failed(items[done:], [c for c in cached if not c[1].future.done()], exc)

    def _fill_failed(
        self,
        items: list[tuple[tuple[int, int], _Entry]],
        cached: list[tuple[tuple[int, int], _Entry]],
        exc: BaseException,
    ) -> None:
        with self._lock:  # forget the failure, so a later read tries again
            for key, e in cached:
                if self._entries.get(key) is e:
                    self._drop(key)
        for _, e in items:
            _resolve(e.future, None, exc)

    def _drop_small_blocks_in(self, ci: int) -> None:
        """A chunk supersedes the small blocks it covers: free their room."""
        C, S = self.chunk_size, self._small
        with self._lock:
            for b in range(ci * C // S, -(-min((ci + 1) * C, self._size) // S)):
                e = self._entries.get((0, b))
                if e is not None and e.future.done():
                    self._drop((0, b))


def describe(exc: BaseException) -> str:
    """A one-line description of a low-level error for messages."""
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if exc.__class__.__name__ not in text else text


__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_CHUNK",
    "DEFAULT_READAHEAD",
    "DEFAULT_REQUEST",
    "ReadAheadSource",
    "RetryPolicy",
    "Transient",
    "describe",
]
