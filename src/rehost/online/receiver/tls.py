"""The receiver's side of TLS, decrypted from memory rather than the socket.

An `ssl.SSLSocket` lets OpenSSL read the socket itself: two `read`s per 16 KiB record (its
header, then its body), 130,000 a GiB, and every byte of every disk arrives this way. Here
the socket is read in pieces of up to RECV_BYTES and OpenSSL decrypts from a memory BIO. In
the sync benchmark (docs/benchmarks.md) this took the receiver's CPU for the 1.04 GiB full
copy from 4.3–4.6 to 3.3–3.8 s. The class is a `socket.socket`, so `makefile`, timeouts,
`shutdown` and `getpeername` are the socket's own, and http.server uses it as it uses an
SSLSocket. (The agent's sending side measured the same either way, so it keeps SSLSocket.)
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, cast

RECV_BYTES = 256 * 1024
"""One socket read: about what a busy TCP connection has queued; bounds the memory BIO."""
SEND_BYTES = 256 * 1024
"""Plain bytes encrypted per socket write: a large answer is not held as ciphertext whole."""


class TlsConnection(socket.socket):
    """The server side of a TLS connection on an accepted socket (which it takes over)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        self.settimeout(sock.gettimeout())
        sock.detach()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self._raw = bytearray(RECV_BYTES)

    def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ssl.SSLEOFError(
                        "the peer closed the connection in the handshake"
                    ) from None
        self._flush()

    def _flush(self) -> None:
        if self._out.pending:
            super().sendall(self._out.read())

    def _fill(self) -> bool:
        """Feed OpenSSL one socket read; False at the end of the stream."""
        got = super().recv_into(self._raw)
        if not got:
            self._in.write_eof()
            return False
        self._in.write(memoryview(self._raw)[:got])
        return True

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Up to nbytes of plain text: what one socket read decrypts to, at least one byte;
        0 at the end of the stream, with or without the peer's close_notify (as an
        SSLSocket with suppress_ragged_eofs, the default)."""
        if flags:
            raise ValueError("flags are not supported on a TLS connection")
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        got = 0
        while got < want:
            try:
                # a count, given a buffer (typeshed has only the bytes of the other form)
                n = cast(int, self._tls.read(want - got, view[got:]))
                if not n:  # close_notify came (Python reports it so, not as an error)
                    break
                got += n
            except ssl.SSLWantReadError:
                if got or self._in.eof:
                    break  # what has arrived (the caller asks again for the rest), or none
                self._flush()  # a post-handshake message OpenSSL has to say first
                self._fill()  # at the end of the stream OpenSSL now sees the end
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        return got

    # recv, send and sendall too: none of the socket's own may reach the wire around TLS
    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buf = bytearray(bufsize)
        return bytes(buf[: self.recv_into(buf, bufsize, flags)])

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags:
            raise ValueError("flags are not supported on a TLS connection")
        view = memoryview(data).cast("B")
        for start in range(0, len(view), SEND_BYTES):
            self._tls.write(view[start : start + SEND_BYTES])
            self._flush()

    def send(self, data: Any, flags: int = 0) -> int:
        view = memoryview(data).cast("B")
        self.sendall(view, flags)
        return len(view)
