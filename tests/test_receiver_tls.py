"""The receiver's TLS connection (memory BIOs): what an SSLSocket gave http.server, byte for
byte, against a real client SSLSocket over a real socket pair."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import pytest

from rehost.online.receiver.server import ensure_certificate
from rehost.online.receiver.tls import RECV_BYTES, TlsConnection


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key, _ = ensure_certificate(tmp_path_factory.mktemp("tls"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


Client = Callable[[ssl.SSLSocket], None]
Connect = Callable[[Client], TlsConnection]


@pytest.fixture
def pair(context: ssl.SSLContext) -> Iterator[Connect]:
    """connect(client): a server-side TlsConnection after its handshake, with `client`
    running on the other end in a thread (joined, and its failure raised, at teardown)."""
    made: list[tuple[TlsConnection, threading.Thread, list[BaseException]]] = []

    def connect(client: Client) -> TlsConnection:
        theirs, ours = socket.socketpair()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with _client_context().wrap_socket(theirs) as tls:
                    client(tls)
            except BaseException as e:  # reported by the test's teardown
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        conn = TlsConnection(ours, context)
        conn.settimeout(30)
        conn.handshake()
        made.append((conn, thread, errors))
        return conn

    yield connect
    for conn, thread, errors in made:
        conn.close()
        thread.join(30)
        assert not thread.is_alive()
        if errors:
            raise errors[0]


def test_a_stream_of_many_records_reads_back_exactly(pair: Connect) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)

    def client(tls: ssl.SSLSocket) -> None:
        pos = 0
        for size in (1, 100, 16384, 16385, 70000, 1 << 20):  # records of every size
            tls.sendall(data[pos : pos + size])
            pos += size
        tls.sendall(data[pos:])
        # close_notify; the server does not answer one, it reads to the end and closes
        with contextlib.suppress(ssl.SSLError, OSError):
            tls.unwrap()

    conn = pair(client)
    with conn.makefile("rb") as f:
        got = f.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert conn.recv_into(bytearray(10)) == 0  # the end stays the end


def test_one_read_returns_what_one_socket_read_decrypts(pair: Connect) -> None:
    """Not one record per call (the point of the class), and never more than asked."""
    sent = threading.Event()
    data = os.urandom(128 * 1024)

    def client(tls: ssl.SSLSocket) -> None:
        tls.sendall(data)
        sent.set()
        tls.recv(1)  # until the server closes

    conn = pair(client)
    sent.wait(30)
    buf = bytearray(RECV_BYTES)
    got = 0
    calls = 0
    while got < len(data):
        n = conn.recv_into(memoryview(buf)[got:], min(100_000, len(data) - got))
        assert 0 < n <= 100_000
        got += n
        calls += 1
    assert bytes(buf[:got]) == data
    assert calls <= 4  # 8 records of 16 KiB, at most 100,000 bytes a call


def test_an_end_without_close_notify_reads_as_the_end(pair: Connect) -> None:
    """A peer gone without close_notify, even inside a record, is the end of the stream
    (an SSLSocket's suppress_ragged_eofs): the framing above says what was cut short."""

    handshaken = threading.Event()

    def client(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"complete")
        handshaken.wait(30)
        tls.setblocking(False)  # read the session tickets: a close with unread data resets
        with pytest.raises(ssl.SSLWantReadError):
            tls.recv(1)
        raw = socket.socket(fileno=os.dup(tls.fileno()))
        raw.sendall(b"\x17\x03\x03\x40\x00" + b"x" * 100)  # a record's head, then 100 of 16 KiB
        raw.shutdown(socket.SHUT_WR)
        raw.close()

    conn = pair(client)
    handshaken.set()
    with conn.makefile("rb") as f:
        assert f.read() == b"complete"


def test_answers_of_any_size_arrive_whole(pair: Connect) -> None:
    answer = os.urandom(3 * 256 * 1024 + 7)
    received: list[bytes] = []

    def client(tls: ssl.SSLSocket) -> None:
        got = b""
        while len(got) < len(answer):
            got += tls.recv(1 << 20)
        received.append(got)

    conn = pair(client)
    assert conn.send(memoryview(answer)) == len(answer)
    conn.shutdown(socket.SHUT_WR)
    with conn.makefile("rb") as f:
        assert f.read() == b""
    assert received == [answer]  # the client had it all before it closed


def test_a_peer_gone_in_the_handshake_is_an_error(context: ssl.SSLContext) -> None:
    theirs, ours = socket.socketpair()
    theirs.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    theirs.close()
    conn = TlsConnection(ours, context)
    with conn, pytest.raises(ssl.SSLError):
        conn.handshake()


def test_the_descriptor_is_taken_over(context: ssl.SSLContext) -> None:
    """The accepted socket is left detached: closing it (as socketserver does) cannot close
    the descriptor the connection now owns."""
    theirs, ours = socket.socketpair()
    fd = ours.fileno()
    conn = TlsConnection(ours, context)
    assert ours.fileno() == -1 and conn.fileno() == fd
    ours.close()
    os.fstat(fd)  # still open
    conn.close()
    theirs.close()
    with pytest.raises(OSError):
        os.fstat(fd)
