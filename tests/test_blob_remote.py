"""Remote byte sources: S3 objects and https URLs against a real SeaweedFS, and the cache.

The read-ahead cache and the retry policy are also tested on an in-memory fake
(exact fetch counts, injected faults), where timing can be controlled.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import gzip
import http.server
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mypy_boto3_s3 import S3Client

from helpers import MiB, s3_client, write_guest
from rehost import objectstore
from rehost.blob.https import HttpsSource, public_url
from rehost.blob.readahead import DEFAULT_REQUEST, ReadAheadSource, RetryPolicy, Transient
from rehost.blob.s3 import S3Source
from rehost.blob.source import open_source
from rehost.errors import (
    AccessDenied,
    SourceChanged,
    SourceNotFound,
    SourceUnavailable,
    SourceUnusable,
    SystemError_,
    TaskTimeout,
)
from rehost.objectstore import StoreInfo
from rehost.offline.state import LOG_FILE
from rehost.offline.task import run_import

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
    with pytest.raises(SourceUnusable) as e:
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
    with pytest.raises(SourceUnavailable) as e:
        HttpsSource(f"http://127.0.0.1:{port}/x?sig=abc", retry=FAST_RETRY)
    assert time.monotonic() - began < 20  # the policy's deadline is 5 s
    assert "gave up after 4 attempts" in str(e.value)
    assert "refused" in str(e.value).lower() and "sig=abc" not in str(e.value)


# -- misbehaving web servers ----------------------------------------------------------


class _Web(http.server.BaseHTTPRequestHandler):
    """A request to a test's own web server: `server.answer(self, n)` answers the n-th."""

    protocol_version = "HTTP/1.1"
    server: _WebServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests += 1
            n = self.server.requests
        self.server.answer(self, n)

    def asked(self) -> tuple[int, int]:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"])
        assert m, self.headers["Range"]
        return int(m[1]), int(m[2])

    def part(
        self,
        data: bytes,
        headers: dict[str, str] | None = None,
        *,
        body: bytes | None = None,
        content_range: str | None = None,
    ) -> None:
        """Answer 206 with the asked part of `data` (or with `body`), plus `headers`."""
        start, end = self.asked()
        end = min(end, len(data) - 1)
        body = data[start : end + 1] if body is None else body
        self.send_response(206)
        self.send_header("Content-Range", content_range or f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def status(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


Answer = Callable[[_Web, int], None]


class _WebServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Answer) -> None:
        super().__init__(("127.0.0.1", 0), _Web)
        self.answer = answer
        self.requests = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        """Set at the end of the test: what stalls or trickles gives up."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hung up on a stalled or refused answer, as it should


@pytest.fixture
def web() -> Iterator[Callable[[Answer], str]]:
    """Starts servers that answer each GET with a test's `answer`; gives their URL."""
    servers: list[_WebServer] = []

    def serve(answer: Answer) -> str:
        server = _WebServer(answer)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/disk.img"

    yield serve
    for server in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()


ETAG = {"ETag": '"v1"'}
DATA = random.Random(7).randbytes(3 * MiB)
SECRET = "?X-Amz-Signature=secretsecretsecret"


def _guest(tmp_path: Path, size: int) -> bytes:
    raw = tmp_path / "guest.raw"
    write_guest(raw, size, seed=5)
    data = raw.read_bytes()
    raw.unlink()
    return data


def _saved(state: Path) -> dict[str, Any]:
    saved: dict[str, Any] = json.loads((state / "state.json").read_text())
    return saved


@pytest.mark.parametrize("probe_too", [True, False], ids=["every-answer", "after-the-probe"])
def test_gzipped_ranged_answers_are_refused(
    web: Callable[[Answer], str], tmp_path: Path, probe_too: bool
) -> None:
    """The compressed bytes were written as the image and verified (the digest is of the
    bytes read): the import must fail instead, at once, and never be reported done."""
    data = _guest(tmp_path, 8 * MiB)

    def answer(h: _Web, n: int) -> None:
        start, end = h.asked()
        if not probe_too and n == 1:
            h.part(data, ETAG)
            return
        body = gzip.compress(data[start : end + 1])
        h.part(data, {**ETAG, "Content-Encoding": "gzip"}, body=body)

    state = tmp_path / "state"
    with pytest.raises(SourceUnusable) as e:
        run_import(web(answer) + SECRET, tmp_path / "out.raw", state_dir=state)
    assert e.value.code == "SOURCE_UNUSABLE"
    assert "Content-Encoding gzip" in str(e.value) and "Content-Encoding" in e.value.hint
    assert "secret" not in str(e.value)
    assert _saved(state)["status"] == "failed"


def test_a_dropped_etag_with_a_swapped_object_is_source_changed(
    web: Callable[[Answer], str], tmp_path: Path
) -> None:
    """The server ignores If-Match, drops the ETag and serves another image of the same size
    from 4 MiB on (but for the end, which the precheck reads): before, "done, verified",
    with a mix of the two."""
    old = _guest(tmp_path, 16 * MiB)
    new = old[::-1]

    def answer(h: _Web, n: int) -> None:
        if 4 * MiB <= h.asked()[0] < len(old) - MiB:
            h.part(new)
        else:
            h.part(old, ETAG)

    state = tmp_path / "state"
    with pytest.raises(SourceChanged) as e:
        run_import(web(answer), tmp_path / "out.raw", state_dir=state)
    assert 'ETag "v1" → none' in str(e.value)
    assert _saved(state)["status"] == "failed"
    assert (state / "INCOMPLETE").exists()


LAST_MODIFIED = {"Last-Modified": "Mon, 02 Jun 2025 10:00:00 GMT"}


@pytest.mark.parametrize(
    ("at_open", "later"),
    [
        (ETAG, {}),
        (ETAG, LAST_MODIFIED),
        (LAST_MODIFIED, {}),
        ({}, ETAG),
        ({}, LAST_MODIFIED),
        (LAST_MODIFIED, {"Last-Modified": "Tue, 03 Jun 2025 10:00:00 GMT"}),
    ],
    ids=[
        "etag-dropped",
        "etag-dropped-date-kept",
        "date-dropped",
        "etag-appears",
        "date-appears",
        "date-changed",
    ],
)
def test_a_validator_that_comes_or_goes_is_source_changed(
    web: Callable[[Answer], str], at_open: dict[str, str], later: dict[str, str]
) -> None:
    url = web(lambda h, n: h.part(DATA, at_open if n == 1 else later))
    with HttpsSource(url, retry=FAST_RETRY) as src, pytest.raises(SourceChanged) as e:
        src.read(MiB, 100)
    assert "replaced during the import" in str(e.value)
    assert src.retries == 0


def test_an_unpinnable_source_is_imported_with_a_note(
    web: Callable[[Answer], str], tmp_path: Path
) -> None:
    """A plain web server with neither ETag nor Last-Modified is used, but the user is told."""
    data = _guest(tmp_path, 4 * MiB)
    report = run_import(web(lambda h, n: h.part(data)), tmp_path / "out.raw")
    assert report.verified and (tmp_path / "out.raw").read_bytes() == data
    assert any("cannot be pinned" in note for note in report.notes), report.notes
    assert "cannot be pinned" in (Path(report.state_dir) / LOG_FILE).read_text()


def _redirect(location: str) -> Answer:
    return lambda h, n: h.status(302, {"Location": location})


def _headers(headers: dict[str, str]) -> Answer:
    return lambda h, n: h.part(DATA, headers)


SERVER_FAULTS: dict[str, Answer] = {
    "wrong-range": lambda h, n: h.part(
        DATA, ETAG, content_range=None if n == 1 else f"bytes 1-256/{len(DATA)}"
    ),
    "416-to-the-first-byte": lambda h, n: h.status(416, {"Content-Range": "bytes */1000"}),
    "http-400": lambda h, n: h.status(400),
    "302-without-location": lambda h, n: h.status(302),
    "redirect-loop": _redirect("/disk.img"),
    "redirect-to-file": _redirect("file:///etc/passwd"),
    "redirect-to-ftp": _redirect("ftp://example.com/disk.img"),
    "101-headers": _headers({f"X-H{i}": "x" for i in range(101)}),
    "a-64KiB-header-line": _headers({"X-Long": "x" * (64 << 10)}),
    # int() refuses 4,300 digits and more: it was a SystemError_, "a bug in rehost"
    "a-5000-digit-size": lambda h, n: h.part(DATA, ETAG, content_range="bytes 0-0/" + "9" * 5000),
}


@pytest.mark.parametrize("fault", SERVER_FAULTS)
def test_unusable_answers_are_refused_at_once(web: Callable[[Answer], str], fault: str) -> None:
    """What the server did is SOURCE_UNUSABLE, not a bug in rehost, and is not retried
    (the default policy would retry for ~20 s)."""
    url = web(SERVER_FAULTS[fault]) + SECRET
    began = time.monotonic()
    with pytest.raises(SourceUnusable) as e, HttpsSource(url) as src:
        src.read(1000, 100)
    assert time.monotonic() - began < 5
    assert e.value.code == "SOURCE_UNUSABLE"
    assert "bug in rehost" not in e.value.hint
    assert "secret" not in str(e.value) and "passwd" not in str(e.value)


def test_dropped_connections_are_still_retried(web: Callable[[Answer], str]) -> None:
    """Network faults stay transient: a connection closed before the answer is retried."""

    def answer(h: _Web, n: int) -> None:
        if n <= 2:
            h.close_connection = True  # hang up without a word
        else:
            h.part(DATA, ETAG)

    with HttpsSource(web(answer), retry=FAST_RETRY) as src:
        assert src.read(1000, 100) == DATA[1000:1100]
        assert src.retries == 2


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_is_waited_for(web: Callable[[Answer], str], form: str) -> None:
    def answer(h: _Web, n: int) -> None:
        if n > 1:
            h.part(DATA, ETAG)
        elif form == "seconds":
            h.status(503, {"Retry-After": "2"})
        else:
            h.status(429, {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)})

    retry = RetryPolicy(attempts=3, base_delay=0.01, max_delay=5, deadline=10)
    began = time.monotonic()
    with HttpsSource(web(answer), retry=retry) as src:
        assert time.monotonic() - began >= 1.5  # not the policy's 0.01 s
        assert src.retries == 1 and src.read(0, 10) == DATA[:10]


def test_an_unreadable_retry_after_is_still_retried(web: Callable[[Answer], str]) -> None:
    """'²' passes str.isdigit() but not float(): a 503 saying so was a SystemError_ ("a bug
    in rehost") at open, or a damaged image when it came during a metadata read."""

    def answer(h: _Web, n: int) -> None:
        if n in (1, 3):
            h.status(503, {"Retry-After": "²"})
        else:
            h.part(DATA, ETAG)

    with HttpsSource(web(answer), retry=FAST_RETRY) as src:
        assert src.read(1000, 100) == DATA[1000:1100]
        assert src.retries == 2


def test_a_read_answered_by_another_server_is_source_changed(web: Callable[[Answer], str]) -> None:
    """Redirects are followed, and the server that answered at open is pinned like the ETag:
    another server's copy with the same ETag (here the bytes reversed) was imported and
    reported verified when the link began to redirect to it after the open."""
    other = web(lambda h, n: h.part(DATA[::-1], ETAG))
    first = web(_redirect(other))
    source = HttpsSource(first)  # at open: followed, and said
    with source as src:
        assert src.read(1000, 100) == DATA[::-1][1000:1100]
        assert source.notes == [
            f"{public_url(first)} redirects to {other}: the image is read from there, "
            "and a read that another server answers fails"
        ]
    url = web(lambda h, n: h.part(DATA, ETAG) if n == 1 else h.status(307, {"Location": other}))
    with (
        pytest.raises(SourceChanged, match=r"answered from .* during the import"),
        HttpsSource(url, retry=FAST_RETRY) as src,
    ):
        src.read(1000, 100)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head", ["trickled", "100-continue-forever"])
@pytest.mark.parametrize("when", ["at-open", "reading"])
def test_a_head_that_does_not_arrive_is_cut(
    web: Callable[[Answer], str], monkeypatch: pytest.MonkeyPatch, head: str, when: str
) -> None:
    """The read timeout bounds each recv: a head trickled a byte at a time, or 100 Continue
    after 100 Continue, held a read, and --timeout, for hours. A head has MIN_BODY_SECONDS
    (lowered to 1 s here), then it is cut and retried, and the deadline cuts it too."""
    monkeypatch.setattr(HttpsSource, "MIN_BODY_SECONDS", 1.0)

    def answer(h: _Web, n: int) -> None:
        if when == "reading" and h.asked()[1] == 0:
            h.part(DATA, ETAG)
            return
        line = b"HTTP/1.1 100 Continue\r\n\r\n" if head != "trickled" else b""
        text = line or b"HTTP/1.1 206 Partial Content\r\n" + b"X-Slow: " + b"x" * 60000
        while not h.server.stop.wait(0.05 if line else 0.02):
            with contextlib.suppress(OSError):
                h.wfile.write(line or text[:1])
                h.wfile.flush()
            text = text[1:] or text

    began = time.monotonic()
    with (
        pytest.raises(SourceUnavailable, match="head was cut short"),
        HttpsSource(web(answer), retry=FAST_RETRY) as src,
    ):
        src.read(1000, 100)
    assert time.monotonic() - began < 20
    deadline = time.monotonic() + 2  # the import's --timeout, at open or while reading
    monkeypatch.setattr(HttpsSource, "MIN_BODY_SECONDS", 60.0)
    with pytest.raises(TaskTimeout), HttpsSource(web(answer), deadline=deadline) as src:
        src.read(1000, 100)
    assert time.monotonic() - deadline < 3


@pytest.mark.timeout(60)
def test_a_trickling_server_fails_after_retries(
    web: Callable[[Answer], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.1 s never trips the per-recv timeout; each body has a time bound.

    The bound is max(MIN_BODY_SECONDS, length / MIN_BODY_RATE), about a minute and more;
    lowered to 1 s here (a test-only override) so that the test is quick."""
    monkeypatch.setattr(HttpsSource, "MIN_BODY_SECONDS", 1.0)
    monkeypatch.setattr(HttpsSource, "MIN_BODY_RATE", 1 << 40)

    def answer(h: _Web, n: int) -> None:
        start, end = h.asked()
        if end == 0:
            h.part(DATA, ETAG)
            return
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        h.send_header("Content-Length", str(end + 1 - start))
        h.send_header("ETag", ETAG["ETag"])
        h.end_headers()
        for i in range(start, end + 1):
            if h.server.stop.wait(0.1):
                return
            h.wfile.write(DATA[i : i + 1])

    began = time.monotonic()
    with HttpsSource(web(answer), retry=FAST_RETRY) as src:
        with pytest.raises(SourceUnavailable) as e:
            src.read(1000, 100)
        assert src.retries == 3
    assert time.monotonic() - began < 20
    assert "gave up after 4 attempts" in str(e.value) and "cut short" in str(e.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stall", ["before-the-answer", "mid-body", "trickle"])
def test_timeout_stops_an_import_from_a_stalled_server(
    web: Callable[[Answer], str], tmp_path: Path, stall: str
) -> None:
    """To a request that reaches past 16 MiB (but for the end, which the precheck reads) the
    server stops answering, or trickles a byte every 0.1 s: --timeout 5 ends it with
    TASK_TIMEOUT, the import resumable, well before the 30 s socket timeout, the retries or
    the bodies' time bound would. (Judged by the request's end, not its start: a read-ahead
    request may span most of the 64 MiB.)"""
    data = _guest(tmp_path, 64 * MiB)
    stalled = threading.Event()
    stalled.set()

    def answer(h: _Web, n: int) -> None:
        start, end = h.asked()
        if not stalled.is_set() or not (end >= 16 * MiB and start < len(data) - MiB):
            h.part(data, ETAG)
            return
        if stall != "before-the-answer":
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            h.send_header("Content-Length", str(end + 1 - start))
            h.send_header("ETag", ETAG["ETag"])
            h.end_headers()
        if stall == "mid-body":
            h.wfile.write(data[start : start + (end - start) // 2])
        for i in range(start, end + 1) if stall == "trickle" else ():
            if h.server.stop.wait(0.1):
                return
            h.wfile.write(data[i : i + 1])
        h.server.stop.wait()

    url, dest, state = web(answer), tmp_path / "out.raw", tmp_path / "state"
    began = time.monotonic()
    with pytest.raises(TaskTimeout) as e:
        run_import(url, dest, state_dir=state, timeout=5)
    assert time.monotonic() - began < 15
    assert e.value.code == "TASK_TIMEOUT"
    saved = _saved(state)
    assert saved["status"] == "failed" and saved["error"]["code"] == "TASK_TIMEOUT"
    assert (state / "INCOMPLETE").exists()

    stalled.clear()  # the server recovers: the same import resumes and completes
    report = run_import(url, dest, state_dir=state)
    assert report.verified and dest.read_bytes() == data


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

    def _fetch(self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]) -> None:
        self._count_request()
        length = sum(sizes)
        with self.fake_lock:
            fault = self.faults.pop(0) if self.faults else None
            self.fetches[start, length] += 1
        if fault is not None:
            raise fault
        time.sleep(self.delay)
        for n in sizes:
            piece = self.content(start, min(n, self._size - start))
            self._count_bytes(len(piece))
            deliver(piece)
            start += n


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

        def _fetch(
            self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]
        ) -> None:
            last = len(sizes) - 1

            def cut(piece: bytes) -> None:
                nonlocal last
                if not self.shorted and last == 0:
                    self.shorted = True
                    piece = piece[:-1]
                last -= 1
                deliver(piece)

            super()._fetch(start, sizes, cut)

    with Short(4 * MiB, chunk_size=MiB, cache_bytes=2 * MiB, retry=FAST_RETRY) as src:
        assert src.read(0, 3 * MiB) == FakeRemote.content(0, 3 * MiB)
        assert src.retries == 1


def test_a_body_cut_midway_is_resumed_from_the_first_piece_not_delivered() -> None:
    """A request's pieces reach readers as they arrive; a retry after a cut asks only for
    the rest, and readers of the pieces already delivered do not wait for it."""

    class Cut(FakeRemote):
        cuts = 1

        def _fetch(
            self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]
        ) -> None:
            def cut(piece: bytes) -> None:
                deliver(piece)
                if self.cuts and len(sizes) > 2:
                    self.cuts -= 1
                    raise Transient("connection reset after the first piece")

            super()._fetch(start, sizes, cut)

    src = Cut(64 * MiB, chunk_size=MiB, readahead=8, cache_bytes=16 * MiB, retry=FAST_RETRY)
    with src:
        step = 256 * KiB
        for off in range(0, 16 * MiB, step):
            assert src.read(off, step) == FakeRemote.content(off, step)
        assert src.retries == 1
        # The retry asked for the cut request's range less its first (delivered) chunk.
        assert any((s + MiB, n - MiB) in src.fetches for s, n in src.fetches if n > 2 * MiB)
        assert max(src.fetches.values()) == 1


def test_a_fault_after_the_last_piece_costs_no_refetch() -> None:
    class LateFault(FakeRemote):
        def _fetch(
            self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]
        ) -> None:
            super()._fetch(start, sizes, deliver)
            raise Transient("reset while closing the body")

    src = LateFault(4 * MiB, chunk_size=MiB, cache_bytes=4 * MiB, retry=FAST_RETRY)
    with src:
        assert src.read(0, 2 * MiB) == FakeRemote.content(0, 2 * MiB)
        assert src.retries >= 1  # each request faulted, and none was sent again
        assert max(src.fetches.values()) == 1 and src.requests == len(src.fetches)


def test_retries_give_up_and_permanent_errors_are_not_retried() -> None:
    src = FakeRemote(
        MiB,
        faults=[Transient(f"HTTP 503 #{i}") for i in range(4)],
        chunk_size=MiB,
        cache_bytes=2 * MiB,
        retry=FAST_RETRY,
    )
    with src:
        with pytest.raises(SourceUnavailable) as e:
            src.read(0, 10)
        assert "gave up after 4 attempts" in str(e.value)
        assert "HTTP 503 #3" in str(e.value)
        assert src.read(0, 10) == FakeRemote.content(0, 10)  # a later read tries again
    denied = FakeRemote(MiB, faults=[AccessDenied("403")], chunk_size=MiB, cache_bytes=2 * MiB)
    with denied, pytest.raises(AccessDenied):
        denied.read(0, 10)
    assert denied.requests == 1


def test_a_slow_attempt_that_fails_is_still_retried() -> None:
    """The retry budget counts from the first failure: a body cut after a long transfer (such
    as one that overran its time) is retried, not given up on because it was slow."""

    class SlowFault(FakeRemote):
        def _fetch(
            self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]
        ) -> None:
            if not self.retries:
                time.sleep(0.3)
                raise Transient("cut after a slow transfer")
            super()._fetch(start, sizes, deliver)

    retry = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=0.2)
    with SlowFault(MiB, chunk_size=MiB, cache_bytes=2 * MiB, retry=retry) as src:
        assert src.read(0, 10) == FakeRemote.content(0, 10)
        assert src.retries == 1


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
    # A cache with room for each region's chunk or small block, as the default's 136 MiB has
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
        # a vhd's block: half a chunk less a sector, then a sector of the next chunk
        block = src.read_parts(7 * MiB + 512 * KiB + 512, 512 * KiB)
        assert [type(p) for p in block] == [memoryview, bytes]
        assert b"".join(block) == FakeRemote.content(7 * MiB + 512 * KiB + 512, 512 * KiB)
