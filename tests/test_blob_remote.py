"""Remote byte sources: S3 objects and https URLs against a real SeaweedFS, and the cache.

The read-ahead cache and the retry policy are also tested on an in-memory fake
(exact fetch counts, injected faults), where timing can be controlled.
"""

from __future__ import annotations

import collections
import http.server
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mypy_boto3_s3 import S3Client

from helpers import MiB, s3_client
from rehost import objectstore
from rehost.blob.https import HttpsSource
from rehost.blob.readahead import DEFAULT_REQUEST, ReadAheadSource, RetryPolicy, Transient
from rehost.blob.s3 import S3Source
from rehost.blob.source import open_source
from rehost.errors import AccessDenied, SourceChanged, SourceNotFound, SystemError_
from rehost.objectstore import StoreInfo

KiB = 1 << 10
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=5)


def presign(store: StoreInfo, bucket: str, key: str, expires: int = 3600) -> str:
    """A SigV4 presigned GET URL, as S3 and most compatible stores issue them."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key,
        region_name=store.region,
        config=Config(signature_version="s3v4"),
    )
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )


def upload(client: S3Client, bucket: str, key: str, data: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=data)


Opener = Callable[..., ReadAheadSource]


@pytest.fixture(params=["s3", "https"])
def opener(request: pytest.FixtureRequest, s3_env: StoreInfo) -> Opener:
    """Opens (bucket, key) as an S3Source or as an HttpsSource over a presigned URL."""

    def open_(bucket: str, key: str, **kw: object) -> ReadAheadSource:
        if request.param == "s3":
            return S3Source(bucket, key, **kw)  # type: ignore[arg-type]
        return HttpsSource(presign(s3_env, bucket, key), **kw)  # type: ignore[arg-type]

    return open_


def check_reads(src: ReadAheadSource, data: bytes, reads: list[tuple[int, int]]) -> None:
    for off, n in reads:
        got = src.read(off, n)
        want = data[off : off + n]
        assert len(got) == len(want), (off, n)
        assert got == want, (off, n)
        assert src.cache_bytes <= src.cache_limit


# -- against SeaweedFS --------------------------------------------------------------


def test_reads_are_byte_exact(s3_env: StoreInfo, s3_bucket: str, opener: Opener) -> None:
    size = 21 * MiB + 12345  # a partial last chunk
    data = os.urandom(size)
    upload(s3_client(s3_env), s3_bucket, "img", data)
    rng = random.Random(5)
    lengths = [1, 17, 4 * KiB, 64 * KiB, 300 * KiB, 2 * MiB, 4 * MiB, 9 * MiB]
    reads = [(rng.randrange(size), rng.choice(lengths)) for _ in range(120)]
    reads += [(size - 5, 100), (size - 1, 1), (size, 10), (size + 7, 10), (0, 0), (0, size + 99)]
    reads += [(c * 4 * MiB - 3, 6) for c in range(1, 6)]  # across chunk boundaries
    with opener(s3_bucket, "img", chunk_size=4 * MiB, readahead=3, cache_bytes=24 * MiB) as src:
        assert src.size == size
        check_reads(src, data, reads)
        sequential = [(off, 1 * MiB + 3) for off in range(0, size, 1 * MiB + 3)]
        check_reads(src, data, sequential)
        assert src.peak_cache_bytes <= src.cache_limit
        assert "?" not in src.name
        with pytest.raises(ValueError):
            src.read(-1, 5)


def test_concurrent_reads_fetch_each_byte_about_once(
    s3_env: StoreInfo, s3_bucket: str, opener: Opener
) -> None:
    """Converter-like: threads read runs in roughly increasing order; small and large reads."""
    size = 40 * MiB + 777
    data = os.urandom(size)
    upload(s3_client(s3_env), s3_bucket, "img", data)
    rng = random.Random(9)
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        n = rng.choice([3 * KiB, 40 * KiB, 700 * KiB, 2 * MiB, 4 * MiB])
        runs.append((pos, n))
        pos += n
    with opener(s3_bucket, "img", cache_bytes=64 * MiB) as src:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda r: src.read(*r), runs))
        assert b"".join(got) == data
        assert src.bytes_fetched <= 1.1 * size
        assert src.peak_cache_bytes <= src.cache_limit
        # Big aligned requests, not one per read: the open, one for the stream's first
        # chunk, and about one per request-sized group of chunks after it.
        sent = src.requests - src.retries  # a retry under load is no extra fetch
        assert sent <= 2 + -(-size // DEFAULT_REQUEST) + 2 < len(runs) / 3


def test_scattered_small_reads_fetch_small_blocks(s3_env: StoreInfo, s3_bucket: str) -> None:
    """Table lookups all over the file must not pull in whole chunks, let alone read-ahead."""
    size = 30 * MiB
    data = bytes(size)
    upload(s3_client(s3_env), s3_bucket, "img", data)
    with S3Source(s3_bucket, "img") as src:
        offsets = [i * 3 * MiB + 1000 for i in range(10)]
        for _ in range(3):
            for off in offsets:
                assert src.read(off, 512) == bytes(512)
        assert src.bytes_fetched <= len(offsets) * 256 * KiB
        # The HEAD, then one small block each (retries under load aside).
        assert src.requests - src.retries == 1 + len(offsets)


def test_open_source_dispatches(s3_env: StoreInfo, s3_bucket: str) -> None:
    upload(s3_client(s3_env), s3_bucket, "dir/disk.qcow2", b"hello world")
    src = open_source(f"s3://{s3_bucket}/dir/disk.qcow2")
    assert isinstance(src, S3Source)
    with src:
        assert src.name == f"s3://{s3_bucket}/dir/disk.qcow2"
        assert src.read(6, 100) == b"world"
        assert src.etag.startswith('"') and src.last_modified and src.version_id is None
    url = presign(s3_env, s3_bucket, "dir/disk.qcow2")
    web = open_source(url)
    assert isinstance(web, HttpsSource)
    with web:
        assert web.name == url.split("?")[0]
        assert web.etag == src.etag and web.last_modified
        assert web.read(0, 5) == b"hello"
        assert web.read(11, 5) == b""
    with pytest.raises(SourceNotFound):
        open_source("ftp://example.com/x")
    with pytest.raises(SourceNotFound):
        open_source(f"s3://{s3_bucket}")


def test_empty_object(s3_env: StoreInfo, s3_bucket: str, opener: Opener) -> None:
    upload(s3_client(s3_env), s3_bucket, "empty", b"")
    with opener(s3_bucket, "empty") as src:
        assert src.size == 0
        assert src.read(0, 10) == b""


def test_missing_key_and_bucket(s3_env: StoreInfo, s3_bucket: str, opener: Opener) -> None:
    with pytest.raises(SourceNotFound) as e:
        opener(s3_bucket, "nope.qcow2")
    assert "nope.qcow2" in str(e.value)
    with pytest.raises(SourceNotFound) as e:
        opener("no-such-bucket-rehost", "disk.qcow2")
    assert "no-such-bucket-rehost" in str(e.value)


def test_wrong_secret_is_access_denied(
    s3_env: StoreInfo, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3_client(s3_env), s3_bucket, "img", b"x" * 100)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(AccessDenied) as e:
        S3Source(s3_bucket, "img")
    assert "AWS_SECRET_ACCESS_KEY" in e.value.hint


def test_tampered_and_expired_links_are_access_denied(s3_env: StoreInfo, s3_bucket: str) -> None:
    upload(s3_client(s3_env), s3_bucket, "img", b"x" * 100)
    url = presign(s3_env, s3_bucket, "img")
    i = url.index("X-Amz-Signature=") + len("X-Amz-Signature=") + 3
    tampered = url[:i] + ("0" if url[i] != "0" else "1") + url[i + 1 :]
    with pytest.raises(AccessDenied) as e:
        HttpsSource(tampered)
    assert "expired or been tampered" in e.value.hint
    assert "X-Amz-Signature" not in str(e.value) and url[i:] not in str(e.value)
    expiring = presign(s3_env, s3_bucket, "img", expires=1)
    time.sleep(2.1)
    with pytest.raises(AccessDenied):
        HttpsSource(expiring)


def test_object_replaced_mid_read(s3_env: StoreInfo, s3_bucket: str, opener: Opener) -> None:
    client = s3_client(s3_env)
    data = os.urandom(12 * MiB)
    upload(client, s3_bucket, "img", data)
    with opener(s3_bucket, "img", chunk_size=2 * MiB, cache_bytes=8 * MiB) as src:
        assert src.read(0, 4096) == data[:4096]
        upload(client, s3_bucket, "img", os.urandom(12 * MiB))
        assert src.read(100, 100) == data[100:200]  # cached: still the old version
        with pytest.raises(SourceChanged) as e:
            src.read(9 * MiB, 4096)
        assert "replaced during the import" in str(e.value)
        assert src.retries == 0  # a changed object is not retried


class _NoRangeHandler(http.server.BaseHTTPRequestHandler):
    """A server that ignores Range and streams the whole (large) body with 200."""

    sent: list[int] = []  # noqa: RUF012 - per test, reset by the fixture
    done = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(512 * MiB))
        self.end_headers()
        n = 0
        try:
            block = bytes(MiB)
            for _ in range(512):
                self.wfile.write(block)
                n += len(block)
        except OSError:
            pass  # the client hung up, as it should
        finally:
            type(self).sent.append(n)
            type(self).done.set()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    _NoRangeHandler.sent = []
    _NoRangeHandler.done = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoRangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_ignoring_range_is_refused(http_server: str) -> None:
    with pytest.raises(SystemError_) as e:
        HttpsSource(f"{http_server}/disk.img?token=secret")
    assert "ignored the Range header" in str(e.value)
    assert "secret" not in str(e.value)
    # The client hung up at once: the server got nowhere near sending the 512 MiB.
    assert _NoRangeHandler.done.wait(30)
    assert _NoRangeHandler.sent[0] < 64 * MiB


def test_connection_refused_gives_up_with_the_last_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    began = time.monotonic()
    with pytest.raises(SystemError_) as e:
        HttpsSource(f"http://127.0.0.1:{port}/x?sig=abc", retry=FAST_RETRY)
    assert time.monotonic() - began < 20  # the policy's deadline is 5 s
    assert "gave up after 4 attempts" in str(e.value)
    assert "refused" in str(e.value).lower() and "sig=abc" not in str(e.value)


def test_survives_store_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store goes away mid-import and comes back on the same port: reads resume."""
    directory = tmp_path / "store"
    info = objectstore.start(directory)
    try:
        for key, value in info.env().items():
            monkeypatch.setenv(key, value)
        client = s3_client(info)
        client.create_bucket(Bucket="restart")
        data = os.urandom(6 * MiB)
        upload(client, "restart", "img", data)
        retry = RetryPolicy(attempts=40, base_delay=0.1, max_delay=1.0, deadline=50)
        kw = {"chunk_size": MiB, "readahead": 1, "cache_bytes": 4 * MiB, "retry": retry}
        sources: list[ReadAheadSource] = [
            S3Source("restart", "img", **kw),  # type: ignore[arg-type]
            HttpsSource(presign(info, "restart", "img"), **kw),  # type: ignore[arg-type]
        ]
        for src in sources:
            assert src.read(0, 1000) == data[:1000]

        objectstore.stop(directory)
        restarted: list[BaseException | StoreInfo] = []

        def restart() -> None:
            time.sleep(1.5)
            try:
                restarted.append(objectstore.start(directory, base_port=info.base_port))
            except BaseException as e:
                restarted.append(e)
                raise

        with ThreadPoolExecutor(3) as pool:
            pool.submit(restart)
            reads = [pool.submit(src.read, 4 * MiB, 100 * KiB) for src in sources]
            for r in reads:
                assert r.result() == data[4 * MiB : 4 * MiB + 100 * KiB]
        assert isinstance(restarted[0], StoreInfo), restarted
        for src in sources:
            assert src.retries > 0, src.name
            src.close()
    finally:
        objectstore.stop(directory)


def test_memory_stays_bounded_on_a_large_object(s3_env: StoreInfo, s3_bucket: str) -> None:
    """One sequential pass over a 208 MiB object with the default cache (64 MiB)."""
    size = 208 * MiB + 4097
    rng = random.Random(3)
    parts = bytearray(size)  # mostly zeros, some random blocks
    for i in range(0, size, 8 * MiB):
        parts[i : i + 64 * KiB] = rng.randbytes(64 * KiB)[: size - i]
    data = bytes(parts)
    del parts
    upload(s3_client(s3_env), s3_bucket, "big", data)
    with S3Source(s3_bucket, "big") as src:
        assert src.cache_limit < size
        step = 4 * MiB - 512
        for off in range(0, size, step):
            got = src.read(off, step)
            assert got == data[off : off + step], off
            assert src.cache_bytes <= src.cache_limit
        assert src.peak_cache_bytes <= src.cache_limit
        assert src.bytes_fetched <= 1.1 * size
        assert src.requests - src.retries <= size // src.chunk_size + 10


# -- the cache and retries, on an in-memory fake -------------------------------------


class FakeRemote(ReadAheadSource):
    def __init__(
        self,
        size: int,
        *,
        delay: float = 0.0,
        faults: list[Exception] | None = None,
        **kw: object,
    ) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._size = size
        self._name = "fake://object"
        self.delay = delay
        self.faults = list(faults or [])
        self.fetches: collections.Counter[tuple[int, int]] = collections.Counter()
        self.fake_lock = threading.Lock()

    PATTERN = random.Random(1).randbytes(1_000_003)  # a prime period: no chunk repeats

    @classmethod
    def content(cls, start: int, length: int) -> bytes:
        """Position-dependent bytes, cheap to make for any offset of a huge object."""
        p = len(cls.PATTERN)
        out = bytearray()
        pos = start
        while len(out) < length:
            piece = cls.PATTERN[pos % p : pos % p + length - len(out)]
            out += piece
            pos += len(piece)
        return bytes(out)

    def _fetch(self, start: int, sizes: Sequence[int]) -> list[bytes]:
        self._count_request()
        length = sum(sizes)
        with self.fake_lock:
            fault = self.faults.pop(0) if self.faults else None
            self.fetches[start, length] += 1
        if fault is not None:
            raise fault
        time.sleep(self.delay)
        pieces = []
        for n in sizes:
            pieces.append(self.content(start, min(n, self._size - start)))
            start += n
        self._count_bytes(sum(len(p) for p in pieces))
        return pieces


def test_concurrent_readers_of_one_chunk_share_one_fetch() -> None:
    src = FakeRemote(64 * MiB, delay=0.2, chunk_size=MiB, readahead=2, cache_bytes=8 * MiB)
    with src, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: src.read(i * 1000, MiB // 2), range(8)))
        for i, g in enumerate(got):
            assert g == FakeRemote.content(i * 1000, MiB // 2)
        assert max(src.fetches.values()) == 1
        assert src.fetches[0, MiB] == 1


def test_sequential_reads_prefetch_and_stay_bounded() -> None:
    size = 1 << 30  # a GiB object, never held: the cache is 8 MiB
    src = FakeRemote(size, chunk_size=MiB, readahead=4, cache_bytes=8 * MiB)
    with src:
        step = 300 * KiB
        for off in range(0, 64 * MiB, step):
            assert src.read(off, step) == FakeRemote.content(off, step)
            assert src.cache_bytes <= 8 * MiB
        assert src.peak_cache_bytes <= 8 * MiB
        assert max(src.fetches.values()) == 1
        assert src.bytes_fetched <= 64 * MiB + 5 * MiB  # what was read, plus read-ahead
        # Read-ahead got ahead of the reader: fetches in parallel on the pool, whole requests.
        assert any(s + n > 64 * MiB for s, n in src.fetches)
        assert max(n for _, n in src.fetches) == 3 * MiB  # as much as the 8 MiB cache allows


def test_transient_faults_are_retried() -> None:
    faults: list[Exception] = [Transient("HTTP 503"), Transient("connection reset")]
    src = FakeRemote(10 * MiB, faults=faults, chunk_size=MiB, cache_bytes=4 * MiB, retry=FAST_RETRY)
    with src:
        assert src.read(5000, 100) == FakeRemote.content(5000, 100)
        assert src.retries == 2
        assert src.requests == 3


def test_short_bodies_are_retried() -> None:
    class Short(FakeRemote):
        shorted = False

        def _fetch(self, start: int, sizes: Sequence[int]) -> list[bytes]:
            pieces = super()._fetch(start, sizes)
            if not self.shorted:
                self.shorted = True
                pieces[-1] = pieces[-1][:-1]
            return pieces

    with Short(4 * MiB, chunk_size=MiB, cache_bytes=2 * MiB, retry=FAST_RETRY) as src:
        assert src.read(0, 3 * MiB) == FakeRemote.content(0, 3 * MiB)
        assert src.retries == 1


def test_retries_give_up_and_permanent_errors_are_not_retried() -> None:
    src = FakeRemote(
        MiB,
        faults=[Transient(f"HTTP 503 #{i}") for i in range(4)],
        chunk_size=MiB,
        cache_bytes=2 * MiB,
        retry=FAST_RETRY,
    )
    with src:
        with pytest.raises(SystemError_) as e:
            src.read(0, 10)
        assert "gave up after 4 attempts" in str(e.value)
        assert "HTTP 503 #3" in str(e.value)
        assert src.read(0, 10) == FakeRemote.content(0, 10)  # a later read tries again
    denied = FakeRemote(MiB, faults=[AccessDenied("403")], chunk_size=MiB, cache_bytes=2 * MiB)
    with denied, pytest.raises(AccessDenied):
        denied.read(0, 10)
    assert denied.requests == 1


def test_backoff_grows_with_jitter_and_is_bounded() -> None:
    policy = RetryPolicy()
    delays = [policy.delay(n) for n in range(1, 9)]
    assert all(0 < d <= policy.max_delay for d in delays)
    assert delays[5] > delays[0]
    total_worst = sum(min(policy.max_delay, policy.base_delay * 2 ** (n - 1)) for n in range(1, 8))
    assert total_worst <= policy.deadline


def test_close_wakes_waiters_and_refuses_reads() -> None:
    src = FakeRemote(64 * MiB, delay=0.05, chunk_size=MiB, readahead=4, cache_bytes=8 * MiB)
    for off in range(0, 4 * MiB, 512 * KiB):
        src.read(off, 512 * KiB)
    src.close()
    with pytest.raises(SystemError_):
        src.read(0, 10)


def test_addressing_style_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rehost.blob.s3client import addressing_style, make_client

    monkeypatch.delenv("REHOST_S3_ADDRESSING", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert addressing_style() == "auto"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert addressing_style() == "path"
    monkeypatch.setenv("REHOST_S3_ADDRESSING", "virtual")
    assert addressing_style() == "virtual"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    client = make_client()
    assert getattr(client.meta.config, "s3", None) == {
        "addressing_style": "virtual",
        "payload_signing_enabled": False,  # bodies carry a signed Content-MD5 or CRC32C
    }
    assert client.meta.region_name == "eu-west-3"
    monkeypatch.setenv("REHOST_S3_ADDRESSING", "sideways")
    with pytest.raises(SystemError_):
        addressing_style()


@pytest.mark.parametrize("streams", [2, 8, 64])
def test_interleaved_or_strided_reads_fetch_the_object_about_once(streams: int) -> None:
    """A fragmented image read in guest order: 64 KiB reads taking turns between `streams`
    regions of the object (64 regions: each read 1 MiB past the last, a sparse stride).
    Before, read-ahead evicted itself and fetched the object many times over."""
    size, step = 64 * MiB, 64 * KiB
    # A cache with room for each region's chunk or small block, as the default's 72 MiB has
    # for 8 streams of 4 MiB chunks.
    src = FakeRemote(size, chunk_size=MiB, readahead=4, cache_bytes=24 * MiB)
    region = size // streams
    with src:
        for k in range(region // step):
            for r in range(streams):
                off = r * region + k * step
                assert src.read(off, step) == FakeRemote.content(off, step)
        assert src.peak_cache_bytes <= 24 * MiB
    assert src.bytes_fetched <= 1.5 * size


def test_read_parts_copies_a_small_piece_rather_than_pin_its_chunk() -> None:
    src = FakeRemote(16 * MiB, chunk_size=MiB, readahead=2, cache_bytes=8 * MiB)
    with src:
        for off in range(0, 4 * MiB, 256 * KiB):  # a stream: served by whole chunks
            src.read(off, 256 * KiB)
        small = src.read_parts(4 * MiB + 1000, 64 * KiB)
        assert [type(p) for p in small] == [bytes]
        spanning = src.read_parts(6 * MiB - 100 * KiB, 900 * KiB)  # 100 KiB, then 800 KiB
        assert [type(p) for p in spanning] == [bytes, memoryview]
        assert b"".join(spanning) == FakeRemote.content(6 * MiB - 100 * KiB, 900 * KiB)
