"""The agent's HTTPS client: a pinned certificate, the token, a bandwidth cap and retries.

The receiver's certificate is self-signed, so the chain is not checked; its sha256 is pinned
instead and compared before the first byte of a request (the token) leaves this host.
Bodies go out as chunked frame streams on one keep-alive connection; a token bucket paces
every byte written to the socket so that a configured limit holds over short windows.
"""

import hashlib
import http.client
import json
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from rehost.online.protocol import (
    HASH_HEADER,
    PROTOCOL_VERSION,
    SILENCE_SECONDS,
    SOURCE_HEADER,
    AgentError,
    hash_algorithms,
    keep_alive,
)

_RETRYABLE = (OSError, http.client.HTTPException)
_SEND_PIECE = 64 * 1024
_FLUSH = 256 * 1024
STALL_SECONDS = 60.0
"""A connection with data to deliver and no acknowledgement for this long is dead."""
_TCP_INFO = getattr(socket, "TCP_INFO", 11) if sys.platform.startswith("linux") else None
# struct tcp_info up to tcpi_last_ack_recv: 8 u8 (probes at 3), 13 u32 (unacked at 4,
# last_ack_recv at 12, in ms): Linux's ABI since 2.6
_TCP_INFO_HEAD = struct.Struct("=8B13I")
# TLS records and TCP/IP headers add about 3% to what is written to the socket (measured on
# a veth pair); the limit is meant for the link, so each byte is counted with this factor
_WIRE_OVERHEAD = 1.03


class TokenBucket:
    """Paces writes to `rate` bytes/s with a small burst, so 1-second windows stay even."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(16384.0, rate / 20.0)
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            debt = -self.tokens
        if debt > 0:
            time.sleep(debt / self.rate)


class _Connection(http.client.HTTPSConnection):
    """An HTTPSConnection whose writes are counted and paced."""

    def __init__(self, owner: "ReceiverClient", host: str, port: int, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.owner = owner

    def send(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("only bytes are sent")
        view = memoryview(data)
        # pieces only matter for pacing: unpaced, one call writes it all (fewer TLS calls)
        step = _SEND_PIECE if self.owner.bucket is not None else max(len(view), 1)
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            began, cpu = time.monotonic(), time.process_time()
            if self.owner.bucket is not None:
                self.owner.bucket.take(int(len(piece) * _WIRE_OVERHEAD))
            super().send(piece)
            # time blocked, not time encrypting: the CPU this process used meanwhile (TLS,
            # the walk thread) is not waiting for the link
            waited = (time.monotonic() - began) - (time.process_time() - cpu)
            self.owner.send_wait += max(waited, 0.0)
            self.owner.bytes_on_wire += len(piece)


def _common_hash(theirs: Any) -> str:
    """The fastest hash both sides have; a receiver that lists none has blake3 and sha256."""
    offered = theirs if isinstance(theirs, list) else ["blake3", "sha256"]
    return next((alg for alg in hash_algorithms() if alg in offered), "sha256")


def split_address(address: str, default_port: int = 443) -> Tuple[str, int]:
    """ "host:port", "[v6]:port", "host" → (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port)
    return address, default_port


def _stalled_for(sock: Any) -> float:
    """Seconds the peer has not acknowledged anything while there is data for it, or 0.

    Why: keepalives only probe an idle connection. When the network is cut while the
    agent sends, its data waits in flight for the kernel's retransmissions (about 15
    minutes) and its write for the socket's timeout (SILENCE_SECONDS). TCP_USER_TIMEOUT would cut a
    live receiver that stops reading while it hashes a large file (its zero window);
    this does not, as a live receiver answers the window probes.
    """
    if _TCP_INFO is None:
        return 0.0
    head = _TCP_INFO_HEAD.unpack(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)[:60])
    retransmits, probes, unacked, last_ack_recv = head[2], head[3], head[12], head[20]
    # data in flight that has timed out at least once, or window probes going unanswered
    if (unacked and retransmits) or probes >= 2:
        return float(last_ack_recv) / 1000.0
    return 0.0


class ReceiverClient:
    """Talks to one receiver; see docs/online-protocol.md for the endpoints."""

    def __init__(
        self,
        address: str,
        token: str,
        fingerprint: str,
        proxy: Optional[str] = None,
        limit_kbps: int = 0,
        retry_seconds: float = 300.0,
        timeout: float = 60.0,
        source: str = "",
    ) -> None:
        self.host, self.port = split_address(address)
        self.source = source  # source_identity(): a receiver prepared for another refuses us
        self.token = token
        self.fingerprint = fingerprint.lower().replace(":", "")
        self.proxy = split_address(proxy, 3128) if proxy else None
        self.bucket = TokenBucket(limit_kbps * 1024.0) if limit_kbps > 0 else None
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.bytes_on_wire = 0
        self.payload_bytes = 0
        # seconds spent blocked writing to the socket or on the bandwidth limit (not CPU)
        self.send_wait = 0.0
        self.hash_alg = "sha256"  # until a hello says what the receiver has
        self._conn = None  # type: Optional[_Connection]
        self.last_hello = {}  # type: Dict[str, Any]
        # the watchdog that cuts a dead connection (see _stalled_for), and why it last did
        self._lock = threading.Lock()
        self._watchdog = None  # type: Optional[threading.Thread]
        self.cut_reason = ""

    # --- connection -------------------------------------------------------------------

    def _connect(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        versions = getattr(ssl, "TLSVersion", None)  # Python 3.7+; the OP_NO_* flags are
        if versions is not None:  # deprecated there, and the only way on 3.6
            context.minimum_version = versions.TLSv1_2  # novermin (guarded)
        else:
            context.options |= getattr(ssl, "OP_NO_TLSv1", 0) | getattr(ssl, "OP_NO_TLSv1_1", 0)
        if self.proxy is not None:
            conn = _Connection(
                self, self.proxy[0], self.proxy[1], context=context, timeout=self.timeout
            )
            conn.set_tunnel(self.host, self.port)
        else:
            conn = _Connection(self, self.host, self.port, context=context, timeout=self.timeout)
        conn.connect()
        sock = conn.sock
        keep_alive(sock)
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        seen = hashlib.sha256(der or b"").hexdigest()
        if seen != self.fingerprint:
            conn.close()
            raise AgentError(
                "FINGERPRINT_MISMATCH",
                f"the receiver at {self.host}:{self.port} presented certificate {seen} but {self.fingerprint} is pinned",
                "copy the fingerprint the receiver printed (STATE/fingerprint) into "
                "Destination.Fingerprint; if it changed unexpectedly, something is in between",
            )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a bodiless request first: a refused token then gets its 401 cleanly, instead of
        # the receiver closing on a half-sent stream
        conn.request("GET", "/v1/hello", headers=self._headers(None))
        try:
            self.last_hello = self._response(conn, "GET", "/v1/hello")
        except BaseException:
            conn.close()
            raise
        if self.last_hello.get("protocol") != PROTOCOL_VERSION:
            conn.close()
            raise AgentError(
                "PROTOCOL_MISMATCH",
                "the receiver at {}:{} speaks protocol {}, this agent {}".format(
                    self.host, self.port, self.last_hello.get("protocol"), PROTOCOL_VERSION
                ),
                "run the agent bundled by the same rehost version as the receiver "
                "(rehost agent-bundle)",
            )
        self.hash_alg = _common_hash(self.last_hello.get("hashes"))
        # `timeout` bounded the connect and the hello; from here a silent receiver is a
        # busy one unless keepalives or the watch say otherwise (see SILENCE_SECONDS)
        sock.settimeout(SILENCE_SECONDS)
        with self._lock:
            self._conn = conn
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="connection-watchdog", daemon=True
                )
                self._watchdog.start()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _watch(self) -> None:
        """Shut down a connection found dead (the blocked write then fails and the batch is
        retried on a new one); exit once no connection is open."""
        while True:
            time.sleep(min(STALL_SECONDS / 4, 10.0))
            with self._lock:
                conn = self._conn
                if conn is None or conn.sock is None:
                    self._watchdog = None
                    return
                try:
                    stalled = _stalled_for(conn.sock)
                    if stalled >= STALL_SECONDS:
                        self.cut_reason = (
                            f"nothing sent was acknowledged for {stalled:.0f} s: the network to "
                            "the receiver is cut"
                        )
                        conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed meanwhile
                    pass

    def _headers(self, content_type: Optional[str]) -> Dict[str, str]:
        headers = {"Authorization": "Bearer " + self.token, HASH_HEADER: self.hash_alg}
        if self.source:
            headers[SOURCE_HEADER] = self.source
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _response(self, conn: _Connection, method: str, path: str) -> Dict[str, Any]:
        resp = conn.getresponse()
        body = resp.read()
        try:
            obj = json.loads(body.decode("utf-8")) if body else {}
        except ValueError:
            obj = {"message": body[:200].decode("utf-8", "replace")}
        if resp.status == 401:
            raise AgentError(
                "TOKEN_REJECTED",
                "the receiver refused the token (401)",
                "set Destination.Token to the token the receiver was started with",
            )
        if resp.status >= 400:
            # a RehostError's answer says what failed in "message" and why in "reason"
            why = ": ".join(str(obj[k]) for k in ("message", "reason") if obj.get(k))
            raise AgentError(
                str(obj.get("code") or "RECEIVER_ERROR"),
                f"{method} {path} failed with {resp.status}: {why}",
                str(obj.get("hint") or "see the receiver's log"),
            )
        if not isinstance(obj, dict):
            raise AgentError("RECEIVER_ERROR", "the receiver's answer is not a JSON object")
        return obj

    def _take_cut_reason(self) -> str:
        reason, self.cut_reason = self.cut_reason, ""
        return reason

    def _retrying(self, attempt: Any) -> Dict[str, Any]:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return attempt(self._connect())  # type: ignore[no-any-return]
            except AgentError:
                self.close()
                raise
            except _RETRYABLE as e:
                self.close()
                why = self._take_cut_reason() or str(e)
                if time.monotonic() + delay > deadline:
                    raise AgentError(
                        "RECEIVER_UNREACHABLE",
                        f"cannot reach the receiver at {self.host}:{self.port}: {why}",
                        "check that the receiver runs and that the port is open (or set Proxy)",
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # --- requests ---------------------------------------------------------------------

    def request_json(
        self, method: str, path: str, obj: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        body = json.dumps(obj).encode("utf-8") if obj is not None else None

        def attempt(conn: _Connection) -> Dict[str, Any]:
            headers = self._headers("application/json" if body is not None else None)
            conn.request(method, path, body=body, headers=headers)
            return self._response(conn, method, path)

        return self._retrying(attempt)

    def hello(self) -> Dict[str, Any]:
        return self.request_json("GET", "/v1/hello")

    def post_json(self, path: str, obj: Dict[str, Any]) -> Dict[str, Any]:
        return self.request_json("POST", path, obj)

    def post_frames(
        self, path: str, frames: Iterable[Union[bytes, Tuple[bytes, bytes]]]
    ) -> Dict[str, Any]:
        """POST a chunked frame stream. A list is re-sent after a connection failure;
        a generator cannot be, so then the failure is raised as RECEIVER_UNREACHABLE.
        A (head, data) item is one frame given in two parts: it is written without
        joining them, as its own HTTP chunk."""
        replayable = isinstance(frames, Sequence)

        def attempt(conn: _Connection) -> Dict[str, Any]:
            conn.putrequest("POST", path)
            for key, value in self._headers("application/octet-stream").items():
                conn.putheader(key, value)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            try:
                pending: List[bytes] = []
                size = 0
                # the CRLF closing a large frame's HTTP chunk goes out with the next write
                crlf = b""
                for frame in frames:
                    if isinstance(frame, tuple):
                        head, body = frame
                    elif len(frame) >= _FLUSH:
                        head, body = b"", frame
                    else:
                        pending.append(frame)
                        size += len(frame)
                        if size >= _FLUSH:
                            conn.send(b"%s%x\r\n%s\r\n" % (crlf, size, b"".join(pending)))
                            pending, size, crlf = [], 0, b""
                        continue
                    # a large frame goes as its own HTTP chunk, its data uncopied: the
                    # receiver then reads it in one piece too; the small frames before it
                    # and the frame's head go in one write
                    lead = b"%x\r\n%s\r\n" % (size, b"".join(pending)) if size else b""
                    conn.send(b"%s%s%x\r\n%s" % (crlf, lead, len(head) + len(body), head))
                    conn.send(body)
                    pending, size, crlf = [], 0, b"\r\n"
                if size:
                    conn.send(b"%s%x\r\n%s\r\n" % (crlf, size, b"".join(pending)))
                    crlf = b""
                conn.send(crlf + b"0\r\n\r\n")
            except OSError as e:
                # the receiver may have refused the stream and said why before closing
                try:
                    answer = self._response(conn, "POST", path)
                except _RETRYABLE:
                    raise e from None
                raise AgentError(
                    "PROTOCOL_ERROR", f"the receiver answered mid-stream: {answer}"
                ) from e
            return self._response(conn, "POST", path)

        if replayable:
            return self._retrying(attempt)
        try:
            return attempt(self._connect())
        except AgentError:
            self.close()
            raise
        except _RETRYABLE as e:
            self.close()
            raise AgentError(
                "RECEIVER_UNREACHABLE",
                f"the connection to {self.host}:{self.port} broke during a transfer: "
                + (self._take_cut_reason() or str(e)),
                "the batch is retried; if this persists check the receiver and the network",
            ) from e
