"""The migration-mode receiver: an HTTPS server that applies what the agent sends.

The standard library's ThreadingHTTPServer is enough: requests are few and long (one
manifest and one streamed DATA POST per batch of ~2000 entries), so a thread per
connection costs nothing, and it keeps the rescue system's dependencies to rehost's own.
TLS handshakes run in the connection's thread, never in the accept loop. The certificate is
self-signed with Debian's `openssl`; the agent pins its sha256 fingerprint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from rehost.errors import RehostError
from rehost.online.protocol import (
    HASH_HEADER,
    PROTOCOL_VERSION,
    SILENCE_SECONDS,
    SOURCE_HEADER,
    ProtocolError,
    hash_algorithms,
    hold_lock,
    keep_alive,
    read_frames,
)
from rehost.online.receiver.apply import FsApplier
from rehost.online.receiver.fixup_hook import run_fixups
from rehost.online.receiver.journal import write_atomic
from rehost.online.receiver.tls import TlsConnection

REAP_SECONDS = 0.5  # how often pre-auth deadlines are checked
EVICT_SECONDS = 1.0  # how long a newcomer waits for the slot of a connection it had cut

log = logging.getLogger("rehost.receiver")

_MAX_JSON = 16 * 1024 * 1024
_TAKEOVER_SECONDS = 2.0  # a filesystem's request waits this long for the last one to end


def ensure_certificate(state_dir: Path, cert_dir: Path | None = None) -> tuple[Path, Path, str]:
    """(cert, key, sha256 fingerprint), making a self-signed pair on first start."""
    tls = cert_dir or state_dir / "tls"
    tls.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = tls / "cert.pem", tls / "key.pem"
    if not (cert.exists() and key.exists()):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
             "-subj", "/CN=rehost-receiver"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.chmod(key, 0o600)
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return cert, key, hashlib.sha256(der).hexdigest()


_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
_DECIMAL = re.compile(r"[0-9]{1,18}")


def _chunk_size(line: bytes) -> int:
    """A chunk's size line, strictly: int() would take "-1" (and a read of -1 bytes reads
    to the end of the stream, into memory) or " 0x10"."""
    size = line.split(b";")[0].strip()
    if not _HEX_SIZE.fullmatch(size):
        raise ProtocolError("BAD_FRAME", f"a bad chunk size line {line[:32]!r}")
    return int(size, 16)


def _content_length(value: str | None) -> int:
    """Content-Length, strictly (the same -1 read to the end of the stream)."""
    if value is None:
        return 0
    if not _DECIMAL.fullmatch(value.strip()):
        raise ProtocolError("BAD_REQUEST", f"a bad Content-Length {value[:32]!r}")
    return int(value)


class _Chunked:
    """A file-like reader of a chunked request body."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.left = 0
        self.done = False

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.left == 0:
            line = self.raw.readline(1024)
            if not line:
                raise ProtocolError("BAD_FRAME", "the body ended without its last chunk")
            self.left = _chunk_size(line)
            if self.left == 0:
                while self.raw.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                self.done = True
                return b""
        data = self.raw.read(min(n, self.left))
        if not data:
            raise ProtocolError("BAD_FRAME", "the body ended inside a chunk")
        self.left -= len(data)
        if self.left == 0:
            self.raw.readline(16)
        return bytes(data)


class _Limited:
    def __init__(self, raw: Any, length: int) -> None:
        self.raw = raw
        self.left = length

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            return b""
        data = self.raw.read(min(n, self.left))
        self.left -= len(data)
        return bytes(data)


class Receiver:
    """The state behind the handlers: token, disks, filesystems and their appliers."""

    def __init__(
        self,
        token: str,
        state_dir: Path,
        disks: dict[str, str],
        roots: dict[str, Path] | None,
        fixups: bool = True,
    ) -> None:
        self.token = token
        self.fixups = fixups
        self.state_dir = state_dir
        self.disks = disks
        self.roots = dict(roots or {})
        self.appliers: dict[str, FsApplier] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.holders: dict[str, socket.socket] = {}  # the connection whose request holds a lock
        self.lock = threading.Lock()
        self.prepared_path = state_dir / "prepared.json"
        self.mounted = False  # prepared filesystems (re)mounted by this process
        self.finalized = threading.Event()

    def prepared(self) -> dict[str, Any] | None:
        if not self.prepared_path.exists():
            return None
        return dict(json.loads(self.prepared_path.read_text()))

    def fs_root(self, fs_id: str) -> Path:
        prepared = self.prepared()
        if prepared and fs_id in prepared.get("filesystems", {}):
            return Path(prepared["filesystems"][fs_id]["mounted_at"])
        if fs_id in self.roots:
            return self.roots[fs_id]
        raise ProtocolError("UNKNOWN_FILESYSTEM", f"no filesystem {fs_id!r} is prepared")

    def ensure_mounted(self) -> None:
        """Mount the prepared filesystems again: after a restart (or a reboot of the rescue
        system) their mounts are gone, and writing into the bare mount points would fill the
        state dir's own disk. A prepare with the recorded layout only verifies and mounts."""
        from rehost.online.receiver import disks

        prepared = self.prepared()
        if self.mounted or prepared is None or not self.disks:
            return
        disks.prepare(prepared["layout"], self.disks, self.state_dir)
        self.mounted = True

    def applier(self, fs_id: str) -> tuple[FsApplier, threading.Lock]:
        with self.lock:
            if fs_id not in self.appliers:
                self.ensure_mounted()
                self.appliers[fs_id] = FsApplier(fs_id, self.fs_root(fs_id), self.state_dir)
                self.locks[fs_id] = threading.Lock()
            return self.appliers[fs_id], self.locks[fs_id]

    def close_appliers(self) -> None:
        with self.lock:
            for applier in self.appliers.values():
                applier.close()
            self.appliers.clear()

    def disk_info(self) -> dict[str, dict[str, Any]]:
        """Each disk's size, and its logical sector size: how far an MBR table reaches."""
        from rehost.online.receiver import disks

        out = {}
        for index, path in self.disks.items():
            size, sector = 0, 512
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    size = os.lseek(fd, 0, os.SEEK_END)
                    if stat.S_ISBLK(os.fstat(fd).st_mode):
                        sector = disks.disk_size(path)[1]  # what prepare plans with
                finally:
                    os.close(fd)
            except OSError:
                pass
            out[index] = {"path": path, "size": size, "sector": sector}
        return out

    def hello(self) -> dict[str, Any]:
        prepared = self.prepared()
        return {
            "protocol": PROTOCOL_VERSION,
            "time": time.time(),
            "hashes": hash_algorithms(),
            "disks": self.disk_info(),
            "prepared": prepared is not None,
            "layout": prepared["layout"] if prepared else None,
            "source": prepared.get("source") if prepared else None,
        }

    def check_source(self, source: str | None) -> None:
        """Refuse a source other than the one this destination was prepared for: two
        servers' trees must never mix on one disk. (Before the check, a second source
        with the same layout would have synced its tree over the first's, each run
        deleting what the other sent.)"""
        prepared = self.prepared()
        bound = str(prepared.get("source") or "") if prepared else ""
        if bound and (source or "").split(" ")[0] != bound.split(" ")[0]:
            raise ProtocolError(
                "DESTINATION_TAKEN",
                f"this destination is being migrated from {_describe(bound)}; the request "
                f"comes from {_describe(source or '')}",
                hint="point each source's Destination at its own receiver; to give this "
                "destination to another source instead, stop its receiver, unmount what it "
                "mounted under STATE/mnt and start it again with an empty --state-dir",
            )

    def prepare(self, layout: dict[str, Any], source: str | None) -> dict[str, Any]:
        from rehost.online.receiver import disks

        with self.lock:
            self.check_source(source)
            result = disks.prepare(layout, self.disks, self.state_dir)
            record = {
                "layout": layout,
                "filesystems": result.get("filesystems", {}),
                "source": source,
            }
            write_atomic(self.prepared_path, json.dumps(record, indent=1).encode())
            self.mounted = True
        self.close_appliers()
        return result

    def finalize(self) -> dict[str, Any]:
        """The fixups on the mounted filesystems, then sync and unmount: ready to boot."""
        from rehost.online.receiver import disks

        self.close_appliers()
        with self.lock:
            self.ensure_mounted()
            prepared = self.prepared() or {}
            mounts = {k: Path(v["mounted_at"]) for k, v in prepared.get("filesystems", {}).items()}
            report = None
            if self.fixups:
                record_path = self.state_dir / "layout.json"
                record = json.loads(record_path.read_text()) if record_path.exists() else {}
                report = run_fixups(
                    mounts,
                    layout=prepared.get("layout"),
                    result=record.get("result"),
                    disks=self.disks,
                    log=lambda line: log.info("fixup: %s", line),
                )
            disks.finalize(self.state_dir)
            self.mounted = False
        self.finalized.set()
        return {"status": "ready to boot", **({"fixups": report} if report is not None else {})}

    def status(self) -> dict[str, Any]:
        journals = {}
        jdir = self.state_dir / "journal"
        if jdir.is_dir():
            for path in sorted(jdir.glob("*.json")):
                journals[path.stem] = json.loads(path.read_text())
        return {"prepared": self.prepared() is not None, "filesystems": journals}


def _describe(source: str) -> str:
    """ "host web1 (machine-id:4c4c...)" from a source identity."""
    ident, _, host = source.partition(" ")
    return f"host {host} ({ident})" if ident else "an agent that does not say which host"


_PREAUTH = threading.local()
"""The connection's _Gate, for its handler: finish_request runs in the connection's thread."""
HEAD_BUDGET = 32 * 1024
"""Bytes of request line and headers an unauthenticated connection may send (an agent's
are a few hundred); http.server alone allows 100 lines of 64 KiB, 6.4 MB a connection."""


class _Head:
    """The connection's stream until it authenticates: reads of the request line and
    headers share HEAD_BUDGET; past it the head simply ends, and is refused as it stands."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.left = HEAD_BUDGET

    def readline(self, size: int = -1) -> bytes:
        n = self.left if size < 0 else min(size, self.left)
        line: bytes = self.raw.readline(n) if n > 0 else b""
        self.left -= len(line)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _shown(path: str) -> str:
    """A request path for the log: its start, with control characters escaped."""
    return repr(path[:120])[1:-1] + ("…" if len(path) > 120 else "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rehost-receiver"
    server: _Server
    rfile: Any  # a _Head until the connection authenticates

    def setup(self) -> None:
        super().setup()
        self._raw_rfile = self.rfile
        self.rfile = _Head(self.rfile)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(body)
        except OSError as e:  # the agent is gone, or a newer request took over (_hold)
            self.close_connection = True
            log.info("%s %s %s -> %d, not delivered: %s", self.client_address[0],
                     self.command, _shown(self.path), status, e)  # fmt: skip
            return
        if status != 401:  # refusals are counted, not logged one by one (see _authorised)
            log.info(
                "%s %s %s -> %d", self.client_address[0], self.command, _shown(self.path), status
            )

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return _Chunked(self.rfile)
        return _Limited(self.rfile, _content_length(self.headers.get("Content-Length")))

    def _json_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding") is not None:
            raise ProtocolError("BAD_REQUEST", "a JSON body is sent with its Content-Length")
        length = _content_length(self.headers.get("Content-Length"))
        if length > _MAX_JSON:
            raise ProtocolError("TOO_LARGE", "the JSON body is too large")
        try:
            obj = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            raise ProtocolError("BAD_JSON", "the body is not JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError("BAD_JSON", "the body is not a JSON object")
        return obj

    def _check_framing(self) -> None:
        """One unambiguous body length, and none on a GET: a body left unread would be
        parsed as the next request on the connection (behind a proxy, a smuggled one)."""
        lengths = self.headers.get_all("Content-Length") or []
        coding = self.headers.get("Transfer-Encoding")
        if len(lengths) > 1 or (coding is not None and lengths):
            raise ProtocolError("BAD_REQUEST", "the request gives its body's length twice")
        if coding is not None and coding.strip().lower() != "chunked":
            raise ProtocolError("BAD_REQUEST", f"a Transfer-Encoding {coding[:32]!r}")
        has_body = coding is not None or (lengths and _content_length(lengths[0]) > 0)
        if has_body and self.command == "GET":
            raise ProtocolError("BAD_REQUEST", "a GET request with a body")

    def _source(self) -> str | None:
        return self.headers.get(SOURCE_HEADER)

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        want = "Bearer " + self.server.receiver.token
        if hmac.compare_digest(given.encode(), want.encode()):
            if self.rfile is not self._raw_rfile:  # the connection's first authorised request
                self.connection.settimeout(self.server.request_timeout)
                self.rfile = self._raw_rfile
                _PREAUTH.gate.release()
            return True
        self.server.quietly(
            "token",
            "refused %s %s from %s: %s token",
            self.command, _shown(self.path), self.client_address[0], "a wrong" if given else "no",
        )  # fmt: skip
        self.close_connection = True
        # the connection ends with this answer: out of its address's count before the client
        # reads it, so that its next connection finds the slot free (not only usually)
        _PREAUTH.gate.release()
        self._reply(401, {"code": "TOKEN_REJECTED", "message": "missing or wrong token"})
        return False

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._authorised():
            return
        receiver = self.server.receiver
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            self._check_framing()
            if parts[:1] != ["v1"] or len(parts) < 2:
                raise LookupError
            route = (self.command, parts[1])
            if route == ("GET", "hello") and len(parts) == 2:
                self._reply(200, receiver.hello())
            elif route == ("GET", "status") and len(parts) == 2:
                self._reply(200, receiver.status())
            elif route == ("POST", "prepare") and len(parts) == 2:
                self._reply(200, receiver.prepare(self._json_body(), self._source()))
            elif route == ("POST", "finalize") and len(parts) == 2:
                receiver.check_source(self._source())
                self._json_body()
                self.close_connection = True
                self._reply(200, receiver.finalize())
                # migration mode ends once "ready to boot" is on the wire
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            elif self.command == "POST" and len(parts) == 3:
                self._fs_request(parts[1], parts[2], parse_qs(url.query))
            else:
                raise LookupError
        except LookupError:
            self.close_connection = True
            self._reply(404, {"code": "NOT_FOUND", "message": f"no endpoint {url.path}"})
        except ProtocolError as e:
            log.warning("rejected %s %s from %s: %s %s", self.command, url.path,
                        self.client_address[0], e.code, e.message)  # fmt: skip
            self.close_connection = True
            answer = {"code": e.code, "message": e.message}
            if e.hint:
                answer["hint"] = e.hint
            status = 409 if e.code in ("STALE_BATCH", "DESTINATION_TAKEN") else 400
            self._reply(status, answer)
        except RehostError as e:
            log.warning("%s %s failed: %s", self.command, url.path, e)
            self.close_connection = True
            self._reply(422, e.to_dict())
        except (ConnectionError, TimeoutError) as e:
            log.warning("%s %s from %s broke off: %s", self.command, url.path,
                        self.client_address[0], e)  # fmt: skip
            self.close_connection = True
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                self._failed(url.path, e)
                return
            log.error("%s %s: a destination filesystem is full: %s", self.command, url.path, e)
            self.close_connection = True
            self._reply(507, {"code": "DESTINATION_FULL", "message": str(e), "hint":
                              "grow the destination disk, or add what grew on the source to "
                              "Excludes; then run the agent again, it resumes"})  # fmt: skip
        except Exception as e:
            self._failed(url.path, e)

    def _failed(self, path: str, e: Exception) -> None:
        log.exception("%s %s failed", self.command, path)
        self.close_connection = True
        self._reply(500, {"code": "RECEIVER_FAILED", "message": str(e),
                          "hint": "see the receiver's log"})  # fmt: skip

    def _fs_request(self, action: str, fs_id: str, query: dict[str, list[str]]) -> None:
        if action not in ("manifest", "data", "finish"):
            raise LookupError
        # before taking the filesystem: another source must not take it over from ours
        self.server.receiver.check_source(self._source())
        applier, lock = self.server.receiver.applier(fs_id)
        self._hold(fs_id, lock)
        try:
            if action == "manifest":
                alg = self.headers.get(HASH_HEADER, "sha256")
                self._reply(200, applier.manifest(read_frames(self._body()), alg))
            elif action == "data":
                try:
                    batch = int(query.get("batch", ["0"])[0])
                except ValueError:
                    raise ProtocolError("STALE_BATCH", "bad batch number") from None
                self._reply(200, applier.data(batch, read_frames(self._body())))
            else:
                self._json_body()
                self._reply(200, applier.finish())
        finally:
            holders = self.server.receiver.holders
            if holders.get(fs_id) is self.connection:
                del holders[fs_id]
            lock.release()

    def _hold(self, fs_id: str, lock: threading.Lock) -> None:
        """Take a filesystem for this request, from a stale request if need be.

        An agent sends one request at a time. One that still holds the filesystem when the
        next comes is stale: its agent gave up on it, and a network cut kept that from the
        receiver, whose read would wait ten minutes. Its socket is shut down, which ends it
        at once, and the newer request goes on.
        """
        holders = self.server.receiver.holders
        if not lock.acquire(timeout=_TAKEOVER_SECONDS):
            stale = holders.get(fs_id)
            if stale is not None:
                peer = "a closed connection"
                with contextlib.suppress(OSError):
                    peer = stale.getpeername()[0]
                    # the TCP socket's shutdown, not the SSL layer's: its reader is busy
                    socket.socket.shutdown(stale, socket.SHUT_RDWR)
                log.warning("%s: took over from a request still open on %s (a stale "
                            "connection)", fs_id, peer)  # fmt: skip
            lock.acquire()
        holders[fs_id] = self.connection


class _Server(ThreadingHTTPServer):
    """The receiver faces whatever can reach its port, often the internet: connections are
    capped and must authenticate promptly, so a flood of idle or half-open connections
    holds a bounded number of threads (each ~70 KiB and a descriptor) for a short while,
    instead of one per connection for ten minutes."""

    daemon_threads = True
    request_queue_size = 64
    max_connections = 64
    """Connections served at once. An agent keeps one; beyond this, a new one takes the slot
    of the oldest that has not authenticated, or is closed if every one has."""
    preauth_timeout = 30.0
    """Seconds a connection has, from its accept, to make its first authorised request:
    its handshake, request line and headers together, however slowly it sends them."""
    preauth_per_ip = 8
    """Connections one address may hold before they authenticate: an agent needs one or
    two, and one client cannot take every slot."""
    request_timeout = SILENCE_SECONDS
    """Seconds a socket operation may wait once the connection has authenticated: an agent
    may be silent while it hashes a large file; keepalives notice a dead one sooner."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, receiver: Receiver):
        self.context = context
        self.receiver = receiver
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._lock = threading.Lock()
        self._quiet: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed)
        self._gates: set[_Gate] = set()  # the connections that have not authenticated
        self._closing = threading.Event()
        super().__init__(address, _Handler)
        threading.Thread(target=self._reap, name="preauth-reaper", daemon=True).start()

    def quietly(self, key: str, fmt: str, *args: Any) -> None:
        """A warning anyone on the internet can cause: at most one per key every 10 s, with
        a count of those left out, so that a flood cannot fill the rescue system's disk."""
        now = time.monotonic()
        with self._lock:
            last, left_out = self._quiet.get(key, (0.0, 0))
            if now - last < 10:
                self._quiet[key] = (last, left_out + 1)
                return
            self._quiet[key] = (now, 0)
        log.warning(fmt + (f" ({left_out} more like it not logged)" if left_out else ""), *args)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not self._make_room():
            self.quietly("full", "refused a connection from %s: %d connections are open, the "
                         "most served at once", client_address[0], self.max_connections)  # fmt: skip
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _make_room(self) -> bool:
        """Every slot is taken: cut the oldest connection that has not authenticated and
        take its slot, so that connections from many addresses cannot lock the agent out
        for their 30 s; an authenticated connection is never cut for a newcomer."""
        with self._lock:
            oldest = min(self._gates, key=lambda g: g.deadline, default=None)
        if oldest is None:
            return False
        self.quietly("evicted", "all %d connections are open: cut the oldest that had not "
                     "authenticated (from %s) to make room", self.max_connections, oldest.ip)  # fmt: skip
        oldest.cut()
        return self._slots.acquire(timeout=EVICT_SECONDS)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        ip = client_address[0]
        with self._lock:
            crowded = sum(g.ip == ip for g in self._gates) >= self.preauth_per_ip
            if not crowded:
                gate = _PREAUTH.gate = _Gate(self, ip, request)
                self._gates.add(gate)
        if crowded:
            self.quietly("crowded", "refused a connection from %s: %d of its connections "
                         "have not authenticated yet", ip, self.preauth_per_ip)  # fmt: skip
            return
        request.settimeout(self.preauth_timeout)
        # answers are written as headers then body: without this, Nagle holds the body back
        # until the agent's delayed ACK of the headers (40 ms per request)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(request)
        # it takes the descriptor over: socketserver's own close of `request` is then a no-op
        tls = TlsConnection(request, self.context)
        try:
            try:
                tls.handshake()
            except (ssl.SSLError, OSError) as e:
                self.quietly("handshake", "TLS handshake with %s failed: %s", ip, e)
                return
            super().finish_request(tls, client_address)
        finally:
            gate.release()
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_WR)
            tls.close()

    def forget(self, gate: _Gate) -> None:
        with self._lock:
            self._gates.discard(gate)

    def _reap(self) -> None:
        """One thread for every connection's pre-auth deadline (not a timer each)."""
        while not self._closing.wait(REAP_SECONDS):
            now = time.monotonic()
            with self._lock:
                late = [g for g in self._gates if g.deadline <= now]
            for gate in late:
                gate.cut()

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):  # a peer that went away between requests
            log.debug("connection from %s ended: %s", client_address[0], error)
            return
        log.warning("connection from %s ended with an error", client_address[0], exc_info=True)


class _Gate:
    """One connection's way to its first authorised request: the server's reaper cuts it
    (shuts the raw socket down, which wakes its handler's blocked read) if it has not got
    there by `deadline`."""

    def __init__(self, server: _Server, ip: str, sock: socket.socket) -> None:
        self.server = server
        self.ip = ip
        # a socket of its own on the connection: wrapping it in TLS detaches `sock` from its
        # descriptor before the handshake, and a shutdown must reach it in any phase
        self.sock = sock.dup()
        self.deadline = time.monotonic() + server.preauth_timeout
        self.open = True  # not authenticated yet
        self.lock = threading.Lock()

    def cut(self) -> None:
        with self.lock:
            if self.open:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Authenticated, or ended: no longer the reaper's or the address's count."""
        with self.lock:
            if not self.open:
                return
            self.open = False
            self.sock.close()  # else the connection outlives its handler's close
        self.server.forget(self)


class ReceiverStartFailed(RehostError):
    code = "RECEIVER_START_FAILED"
    message = "the receiver cannot start"
    default_hint = "see the reason; nothing was changed on the destination disks"


@contextlib.contextmanager
def _state_dir_held(state_dir: Path) -> Iterator[None]:
    """One receiver per state dir, for as long as it serves: two would share its journal
    and prepare its disks twice."""
    fd, holder = hold_lock(str(state_dir / "receiver.lock"))
    if fd < 0:
        raise ReceiverStartFailed(
            f"another receiver (PID {holder}) is using the state dir {state_dir}",
            hint="one receiver serves one destination: stop the other one first, or give "
            "this one its own --state-dir and disks",
        )
    try:
        yield
    finally:
        os.close(fd)


def parse_listen(listen: str) -> tuple[str, int]:
    """ "ADDR:PORT", ":PORT", "[v6]:PORT" → (host, port); an empty host means all IPv4."""
    if listen.startswith("["):
        host, _, port = listen[1:].partition("]:")
    else:
        host, _, port = listen.rpartition(":")
    return host or "0.0.0.0", int(port or 443)


def serve(
    listen: str,
    token: str,
    state_dir: Path,
    disks: dict[str, str],
    *,
    cert_dir: Path | None = None,
    ready: Callable[[str], None] | None = None,
    roots: dict[str, Path] | None = None,
    on_finalized: Callable[[], None] | None = None,
    fixups: bool = True,
) -> bool:
    """Serve until a finalize succeeds (migration mode ends) or SIGTERM/SIGINT.

    `roots` maps fs_id → an existing directory to sync into, used for filesystems that no
    /v1/prepare has mounted (tests, and `rehost receive --root FSID=DIR`). `ready` is called
    with the bound "host:port" once the server accepts connections. After a successful
    POST /v1/finalize has been answered, the server stops and `on_finalized` (the CLI's
    `--reboot`) is called once. Returns whether the migration was finalized. `fixups=False`
    (`--no-fixups`) skips the boot fixups in the finalize.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with _state_dir_held(state_dir):
        cert, key, fingerprint = ensure_certificate(state_dir, cert_dir)
        (state_dir / "fingerprint").write_text(fingerprint + "\n")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        receiver = Receiver(token, state_dir, disks, roots, fixups)
        try:
            server = _Server(parse_listen(listen), context, receiver)
        except OSError as e:
            raise ReceiverStartFailed(
                f"cannot listen on {listen}: {e.strerror or e}",
                hint="another process (a receiver already running, a web server) may hold "
                "the port: stop it, or choose another with --listen; for ports under 1024 "
                "run as root",
            ) from e
        bound = f"{server.server_address[0]!s}:{server.server_address[1]}"
        print(f"rehost receiver listening on {bound}, fingerprint {fingerprint}", flush=True)
        log.info("listening on %s, fingerprint %s", bound, fingerprint)

        def stop(signum: int, frame: Any) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        if ready is not None:
            ready(bound)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            server.receiver.close_appliers()
    if not server.receiver.finalized.is_set():
        return False
    print("finalized: the destination disks are synced and unmounted, ready to boot; "
          "leaving migration mode", flush=True)  # fmt: skip
    log.info("finalized; leaving migration mode")
    if on_finalized is not None:
        on_finalized()
    return True
