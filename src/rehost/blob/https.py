"""An https (or http) URL as a RangeSource: ranged GETs through the shared read-ahead cache.

This is how an image is imported from a link rather than a bucket: a presigned
S3 URL, or a public-read object URL of any S3-compatible store or CDN. The
image readers see only `RangeSource`, so the image streams from the link onto
the destination disk with no staging copy.

The object is opened with `GET` and `Range: bytes=0-0`, not `HEAD`: a presigned
URL is signed for one method, so HEAD is refused on a link made for GET. The
size comes from Content-Range and the ETag from the headers. Every later read
sends `If-Match: <etag>` and checks the ETag (or, without one, the
Last-Modified date) and the total size of the answer, so an object replaced
during the import raises `SourceChanged` instead of yielding a disk stitched
together from two images; an answer that lacks the tag pinned at open, or has
one where there was none, counts as replaced too. A server that sends neither
cannot be pinned: it is used, with a warning in `notes`.

A server that ignores Range and answers 200 with the whole body is refused at
once: streaming gigabytes to read one byte, or holding them in memory, is not
an option. So is one that applies a Content-Encoding (gzip, ...) to its ranged
answers: its bytes are not the object's. Answers rehost cannot use are
`SourceUnusable`, never retried.

A body must arrive within `max(MIN_BODY_SECONDS, length / MIN_BODY_RATE)`, or
its connection is cut and the request retried: the socket timeout only bounds
each recv, and a server trickling a byte a second would hold an import forever.

A presigned URL's query string is its signature: it never appears in `name`,
in messages or in chained exceptions.

urllib3 comes with botocore; it is used directly, through HTTPS_PROXY/NO_PROXY
if set, with its own retries off since `RetryPolicy` does the retrying. Redirects
are followed (never from https to http), and the server that answered at open is
pinned like the ETag: a read answered by another one fails with `SourceChanged`,
since any server can send a matching ETag. A redirect at open is in `notes`.

A head must arrive within MIN_BODY_SECONDS too (the watchdog cuts the connection
of a wait that overruns, see `_watch_heads`).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from rehost.blob.readahead import (
    DEFAULT_CACHE,
    DEFAULT_CHUNK,
    DEFAULT_READAHEAD,
    ReadAheadSource,
    RetryPolicy,
    Transient,
    describe,
)
from rehost.errors import (
    AccessDenied,
    RehostError,
    SourceChanged,
    SourceNotFound,
    SourceUnusable,
    SystemError_,
)

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse, PoolManager, Timeout

LINK_HINT = (
    "the link may have expired or been tampered with (a presigned URL must be used exactly as "
    "issued, before it expires); ask for a fresh link, or check that the object is public-read"
)
NO_RANGE_HINT = (
    "the image must be served by a server that supports ranged GETs (HTTP 206), such as any "
    "S3-compatible object store; import it from there or through a presigned URL"
)
CODING_HINT = (
    "the server applies a content coding (Content-Encoding) to ranged answers, so their bytes "
    "are not the image's; serve the object without one (an S3 object uploaded with "
    "Content-Encoding metadata has the same problem: upload it again without)"
)
UNPINNED_HINT = (
    "the server (or a proxy or CDN in between) sends an ETag or Last-Modified in some answers "
    "and not in others, so it cannot be told whether the object stayed the same; if it was not "
    "replaced, import from a server that sends them consistently, such as the origin store"
)
# At most 20 digits (2^64 has 20): int() refuses 4,300 and more, as a SystemError_.
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d{1,20})-(\d{1,20})|\*)/(\d{1,20}|\*)", re.IGNORECASE)
_ERROR_BODY = 16 << 10
_WATCH_INTERVAL = 0.25
"""Seconds between checks for bodies that overran their time."""


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment: safe to show and to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _secrets_of(url: str) -> list[str]:
    """What of a URL might reveal a signature: the query, and each long value in it."""
    parts = urlsplit(url)
    found = [s for s in (parts.query, parts.fragment, parts.password) if s]
    return found + [v for v in re.split(r"[&=]", parts.query) if len(v) >= 12]


def _s3_error(body: bytes) -> str:
    """`Code: Message` of an S3-style XML error body (never anything else it holds)."""
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    return ": ".join(m.group(1) for m in (code, message) if m)


def _pool_manager(scheme: str, host: str, *, maxsize: int, timeout: Timeout) -> PoolManager:
    """A connection pool, through the proxy that HTTPS_PROXY/HTTP_PROXY/NO_PROXY name if any."""
    import urllib.request

    import urllib3

    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        return urllib3.ProxyManager(proxy, num_pools=4, maxsize=maxsize, timeout=timeout)
    return urllib3.PoolManager(num_pools=4, maxsize=maxsize, timeout=timeout)


_heads = threading.local()
"""The HttpsSource whose request this thread is making (`source`), and whether the wait
for that answer's head was cut (`overran`)."""


def _watch_heads(manager: PoolManager) -> None:
    """Make the connections of `manager` ones whose wait for an answer's head the source's
    watchdog can cut (after MIN_BODY_SECONDS, or at the deadline). The read timeout bounds
    each recv only: a server trickling its head a byte at a time (a 64 KiB line of each of
    100 headers, or 100 Continue after 100 Continue) held a read, and --timeout, for hours."""
    manager.pool_classes_by_scheme = {  # a copy: the module's own dict is not changed
        scheme: _watched_pool(pool_cls)
        for scheme, pool_cls in manager.pool_classes_by_scheme.items()
    }


@functools.cache
def _watched_pool(pool_cls: type) -> type:
    """`pool_cls` with connections whose `getresponse` the watchdog of the thread's source
    can cut (made once per class; a class already watched is its own)."""
    if getattr(pool_cls, "_rehost_watched", False):
        return pool_cls
    base: Any = pool_cls.ConnectionCls  # type: ignore[attr-defined]

    class Watched(base):  # type: ignore[misc]
        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            source, sock = getattr(_heads, "source", None), self.sock
            if source is None or sock is None:
                return super().getresponse(*args, **kwargs)
            cut = functools.partial(sock.shutdown, socket.SHUT_RDWR)
            with source._cut_after(sock, cut, source.MIN_BODY_SECONDS) as overran:
                _heads.overran = overran
                return super().getresponse(*args, **kwargs)

    attrs = {"ConnectionCls": Watched, "_rehost_watched": True}
    return type(pool_cls.__name__, (pool_cls,), attrs)


class HttpsSource(ReadAheadSource):
    """A URL read by ranged GETs pinned to the ETag it had at open.

    `HttpsSource(url, *, chunk_size, readahead, cache_bytes, retry, timeout=30.0,
    pool=None, deadline=None)`; `pool` is an optional urllib3 PoolManager (e.g. with a
    custom CA).
    `name` is the URL without its query; `etag` is the pinned ETag ("" if the
    server sends none) and `last_modified` the Last-Modified header (or None).
    `notes` holds warnings for the user (an object that cannot be pinned). `deadline`
    (a `time.monotonic()`, the import's timeout) bounds every wait; past it, TaskTimeout.
    Counters `bytes_fetched`, `requests`, `retries`.
    """

    MIN_BODY_SECONDS = 60.0
    MIN_BODY_RATE = 64 << 10
    """Bytes per second a body must average (after MIN_BODY_SECONDS), else it is cut and
    retried. Read-ahead keeps about two requests in flight, so this fails only links under
    ~1 Mbit/s, where a 10 GiB image would take about a day: slower is a stuck server. Tests
    lower both to make a trickling server fail quickly."""

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        readahead: int = DEFAULT_READAHEAD,
        cache_bytes: int = DEFAULT_CACHE,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        pool: PoolManager | None = None,
        deadline: float | None = None,
    ) -> None:
        import urllib3

        super().__init__(
            chunk_size=chunk_size,
            readahead=readahead,
            cache_bytes=cache_bytes,
            retry=retry,
            deadline=deadline,
        )
        parts = urlsplit(url)
        self._url = url
        self._name = public_url(url)
        # Whatever might reveal the signature: the query, and each long value in it.
        self._secrets = _secrets_of(url)
        self._origin = ""
        """scheme://host:port of the server that answered at open, redirects followed."""
        self._size = 0
        self.etag = ""
        self.last_modified: str | None = None
        self.notes: list[str] = []
        self._timeout = timeout
        self._bodies: dict[object, tuple[float, Callable[[], object]]] = {}
        """What is being read (a response's body, a connection's wait for a head) → when it
        must have arrived, and how to cut it."""
        self._overran: set[object] = set()
        self._bodies_lock = threading.Lock()
        self._own_http = pool is None
        self._urllib3_retries = urllib3.Retry(
            total=10, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False
        )
        try:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SourceNotFound(f"{self._name}: not an http(s) URL")
            self._http = pool or _pool_manager(
                parts.scheme,
                parts.hostname,
                maxsize=max(8, 2 * self.readahead + 4),
                timeout=self._timeouts(),
            )
            _watch_heads(self._http)
            threading.Thread(target=self._watch, name="https-watch", daemon=True).start()
            self._retrying(self._probe, f"{self._name}: open")
            if not self.etag and not self.last_modified:
                self.notes.append(
                    f"{self._name} has neither an ETag nor a Last-Modified date, so the "
                    "version read cannot be pinned: if it is replaced during the import (or "
                    "before a resume), the change goes unnoticed and the destination may mix "
                    "two images"
                )
        except BaseException:
            self.close()
            raise

    def _timeouts(self) -> Timeout:
        """The connect and per-recv timeouts, cut to what is left before the deadline."""
        import urllib3

        left = self.time_left()
        t = self._timeout if left is None else max(0.01, min(self._timeout, left))
        return urllib3.Timeout(connect=min(10.0, t), read=t)

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "…")
        return text

    def _request(self, start: int, end: int, pinned: bool) -> BaseHTTPResponse:
        headers = {
            "Range": f"bytes={start}-{end}",
            "Accept-Encoding": "identity",
            "User-Agent": "rehost",
        }
        if pinned and self.etag and not self.etag.startswith("W/"):
            headers["If-Match"] = self.etag  # weak ETags never match If-Match: compare instead
        self._count_request()
        _heads.source, _heads.overran = self, [False]
        try:
            resp = self._http.request(
                "GET",
                self._url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                retries=self._urllib3_retries,
                timeout=self._timeouts(),
            )
        except Exception as e:
            failure: Exception | None = self._map_exception(e)  # may hold the signature
        else:
            failure = None
        finally:
            _heads.source = None
        if _heads.overran[0]:  # what a cut head gave (an error, or a truncated head) is moot
            if failure is None:
                self._discard(resp)
            raise self._overran_error(
                "its answer's head was cut short",
                f"it did not arrive within {self.MIN_BODY_SECONDS:.0f}s",
            )
        if failure is not None:
            raise failure from None
        return resp

    def _probe(self) -> None:
        resp = self._request(0, 0, pinned=False)
        try:
            if resp.status == 206:
                self._check_coding(resp)
                total = self._content_range(resp, 0, 0)
            elif resp.status == 416:  # an empty object: nothing satisfies bytes=0-0
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or m.group(3) != "0":
                    raise SourceUnusable(
                        f"{self._name}: HTTP 416 (range not satisfiable) to a request for its "
                        f"first byte, for an object that is not empty "
                        f"(Content-Range {resp.headers.get('Content-Range') or 'none'})"
                    )
                total = 0
            else:
                raise self._status_error(resp)
            self._origin, final = self._answered_from(resp)
            if final != self._url:
                if urlsplit(self._url).scheme == "https" and self._origin.startswith("http:"):
                    raise SourceUnusable(
                        f"{self._name}: the server redirected from https to plain http",
                        hint="import from the final https URL of the object",
                    )
                self._secrets += _secrets_of(final)
                self.notes.append(
                    f"{self._name} redirects to {public_url(final)}: the image is read from "
                    "there, and a read that another server answers fails"
                )
            self.etag = resp.headers.get("ETag", "")
            self.last_modified = resp.headers.get("Last-Modified")
            probe: list[bytes] = []
            if resp.status == 206:
                self._body(resp, [1], probe.append)
            data = probe[0] if probe else b""
        finally:
            self._discard(resp)
        if resp.status == 206 and len(data) != 1:
            raise Transient(f"{self._name}: short body ({len(data)} of 1 byte)")
        self._size = total

    def _fetch(self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]) -> None:
        end = start + sum(sizes) - 1
        resp = self._request(start, end, pinned=True)
        try:
            origin, final = self._answered_from(resp)
            if origin != self._origin:  # the ETag check would pass on any server's copy
                raise SourceChanged(
                    f"{self._name} was answered from {public_url(final)} during the import, "
                    f"not from {self._origin} as when it was opened"
                )
            if resp.status != 206:
                raise self._status_error(resp, reading=True)
            self._check_coding(resp)
            self._check_version(resp)
            total = self._content_range(resp, start, end)
            if total != self._size:
                raise SourceChanged(
                    f"{self._name} was replaced during the import "
                    f"(its size changed from {self._size} to {total} bytes)"
                )
            self._body(resp, sizes, deliver)
        finally:
            self._discard(resp)

    def _answered_from(self, resp: BaseHTTPResponse) -> tuple[str, str]:
        """(scheme://host:port, URL) of the server that answered, after the redirects
        urllib3 followed."""
        history = resp.retries.history if resp.retries is not None else ()
        hops = [h.redirect_location for h in history if h.redirect_location]
        final = hops[-1] if hops else self._url
        parts = urlsplit(final)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}", final

    def _body(
        self, resp: BaseHTTPResponse, sizes: Sequence[int], deliver: Callable[[bytes], None]
    ) -> None:
        """The body in pieces of `sizes` to `deliver`, read within its time or cut short and
        `Transient`."""
        length = sum(sizes)
        allowed = max(self.MIN_BODY_SECONDS, length / self.MIN_BODY_RATE)
        failure: Exception | None = None
        with self._cut_after(resp, resp.shutdown, allowed) as overran:
            try:
                self._read_body(resp.read, sizes, deliver)
            except Exception as e:
                failure = self._map_exception(e)
        if overran[0]:
            raise self._overran_error(
                f"a body of {length} bytes was cut short",
                f"it took over {allowed:.0f}s (under {self.MIN_BODY_RATE >> 10} KiB/s)",
            )
        if failure is not None:
            raise failure

    @contextlib.contextmanager
    def _cut_after(
        self, key: object, cut: Callable[[], object], allowed: float
    ) -> Iterator[list[bool]]:
        """Let the block read `key` for `allowed` seconds (within the deadline); past them
        the watchdog calls `cut`. The list yielded holds True afterwards if it did."""
        due = time.monotonic() + allowed
        if self.deadline is not None:
            due = min(due, self.deadline)
        with self._bodies_lock:
            self._bodies[key] = (due, cut)
        overran = [False]
        try:
            yield overran
        finally:
            with self._bodies_lock:
                del self._bodies[key]
                overran[0] = key in self._overran
                self._overran.discard(key)

    def _overran_error(self, what: str, slow: str) -> Transient:
        if self._closed.is_set():
            why = "the source was closed"
        elif self.time_left() == 0.0:
            why = "the import's timeout ran out"
        else:
            why = slow
        return Transient(f"{self._name}: {what}: {why}")

    def _watch(self) -> None:
        """Cut the connection of each read that overruns its time, and of all at close:
        a blocked recv wakes only when its socket is shut down."""
        while True:
            closed = self._closed.wait(_WATCH_INTERVAL)
            now = time.monotonic()
            with self._bodies_lock:  # held while cutting: nothing is cut once released
                for key, (due, cut) in self._bodies.items():
                    if (closed or now >= due) and key not in self._overran:
                        self._overran.add(key)
                        with contextlib.suppress(Exception):
                            cut()
            if closed:
                return

    @staticmethod
    def _discard(resp: BaseHTTPResponse) -> None:
        """Close the response; a half-read body must not go back into the pool."""
        try:
            resp.close()  # closes the connection only if the body was not read to the end
        finally:
            resp.release_conn()

    def _content_range(self, resp: BaseHTTPResponse, start: int, end: int) -> int:
        header = resp.headers.get("Content-Range", "")
        m = _CONTENT_RANGE.fullmatch(header.strip())
        shown = header if len(header) <= 100 else header[:100] + "…"
        if not m or m.group(1) is None or m.group(3) == "*":
            raise SourceUnusable(
                f"{self._name}: the server answered a ranged GET without a usable "
                f"Content-Range ({shown or 'none'})",
                hint=NO_RANGE_HINT,
            )
        if (int(m.group(1)), int(m.group(2))) != (start, end):
            raise SourceUnusable(
                f"{self._name}: asked for bytes {start}-{end}, got {shown}",
                hint=NO_RANGE_HINT,
            )
        return int(m.group(3))

    def _check_coding(self, resp: BaseHTTPResponse) -> None:
        coding = resp.headers.get("Content-Encoding", "").strip().lower()
        if coding not in ("", "identity"):
            raise SourceUnusable(
                f"{self._name}: the server sent a ranged answer with Content-Encoding "
                f"{coding[:40]}, not the object's own bytes",
                hint=CODING_HINT,
            )

    def _check_version(self, resp: BaseHTTPResponse) -> None:
        """The answer must carry the validator pinned at open: the ETag, else Last-Modified.

        One that is missing now, or present where there was none, counts as a change: a
        server that ignores If-Match and drops the ETag may be serving another object.
        """
        etag = resp.headers.get("ETag", "")
        if self.etag or etag:
            if etag.removeprefix("W/") != self.etag.removeprefix("W/"):
                raise SourceChanged(
                    f"{self._name} was replaced during the import "
                    f"(ETag {self.etag or 'none'} → {etag or 'none'})",
                    hint=None if self.etag and etag else UNPINNED_HINT,
                )
            return
        modified = resp.headers.get("Last-Modified")
        if modified != self.last_modified:
            raise SourceChanged(
                f"{self._name} was replaced during the import "
                f"(Last-Modified {self.last_modified or 'none'} → {modified or 'none'})",
                hint=None if self.last_modified and modified else UNPINNED_HINT,
            )

    def _status_error(self, resp: BaseHTTPResponse, *, reading: bool = False) -> Exception:
        """An unexpected answer → a typed error, or `Transient` when worth retrying.

        `reading`: the object was there at open, so a 404 means it was deleted since.
        """
        status = resp.status
        detail = ""
        if status != 200:  # never read a 200: it may be the whole object
            with contextlib.suppress(Exception):
                detail = _s3_error(resp.read(_ERROR_BODY))
        text = self._scrub(f"HTTP {status}" + (f" ({detail})" if detail else ""))
        if status == 200:
            return SourceUnusable(
                f"{self._name}: the server ignored the Range header and began sending the "
                "whole object (HTTP 200); refusing to download it to read a part",
                hint=NO_RANGE_HINT,
            )
        if status in (404, 410):
            if reading:
                return SourceNotFound(f"{self._name} was deleted during the import ({text})")
            return SourceNotFound(f"{self._name}: {text}")
        if status in (401, 403):
            return AccessDenied(f"{self._name}: {text}", hint=LINK_HINT)
        if status == 412:
            return SourceChanged(
                f"{self._name} was replaced during the import (ETag {self.etag} → "
                f"{resp.headers.get('ETag') or 'a different version'}; {text})"
            )
        if status == 416:
            return SourceChanged(f"{self._name} became shorter during the import ({text})")
        if status >= 500 or status in (408, 425, 429):
            return Transient(f"{self._name}: {text}", retry_after=self._retry_after(resp))
        if 300 <= status < 400:
            text += " without a Location to follow"
        return SourceUnusable(f"{self._name}: unexpected answer {text}")

    @staticmethod
    def _retry_after(resp: BaseHTTPResponse) -> float | None:
        """Retry-After in seconds: a number of seconds or an HTTP date; None if absent or bad."""
        value = resp.headers.get("Retry-After", "").strip()
        if value.isascii() and value.isdigit():  # isdigit alone takes "²", which float refuses
            return float(value)
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        return None

    def _map_exception(self, e: Exception) -> Exception:
        from urllib3 import exceptions as ux

        if isinstance(e, RehostError):
            return e
        reason: Exception = e
        if isinstance(e, ux.MaxRetryError) and e.reason is not None:
            reason = e.reason
        text = self._scrub(describe(reason))
        if isinstance(reason, ux.SSLError):
            return SourceUnusable(
                f"{self._name}: TLS failed: {text}",
                hint="check the server's certificate and this server's CA certificates and clock",
            )
        if isinstance(reason, ux.ResponseError):  # too many redirects
            return SourceUnusable(
                f"{self._name}: {text}",
                hint="the server redirects in a loop or through too many hops; use the final URL",
            )
        if isinstance(reason, ux.LocationValueError):  # a redirect to file://, ftp://, ...
            # Its text may be the whole URL redirected to, signature and all: not shown.
            return SourceUnusable(
                f"{self._name}: the server redirected to a location rehost cannot follow "
                f"({type(reason).__name__})",
                hint="import from the final http(s) URL of the object",
            )
        cause = (
            reason.args[1]
            if isinstance(reason, ux.ProtocolError) and len(reason.args) > 1
            else None
        )
        if isinstance(cause, http.client.HTTPException) and not isinstance(
            cause, OSError | http.client.IncompleteRead
        ):  # a malformed answer: too many headers, a line too long, a bad status line
            return SourceUnusable(
                f"{self._name}: the server's answer is not valid HTTP: {text}",
                hint="import from a standard object store or web server, without a proxy "
                "that mangles the answers",
            )
        if isinstance(reason, ux.HTTPError | OSError):  # resets, timeouts, truncated bodies
            return Transient(f"{self._name}: {text}")
        return SystemError_(f"{self._name}: {text}")

    def close(self) -> None:
        super().close()
        if self.__dict__.get("_own_http") and "_http" in self.__dict__:
            self._http.clear()
