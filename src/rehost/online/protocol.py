# ruff: noqa: UP006, UP007, UP035, UP045
"""The wire format shared by the agent and the receiver (see docs/online-protocol.md).

It lives in one stdlib-only module that runs on Python 3.6, because the agent ships to old
source servers with nothing but their own python3, and both sides must agree byte for byte.
"""

import errno
import functools
import hashlib
import json
import os
import re
import socket
import struct
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple, Union

PROTOCOL_VERSION = 7

ENTRY = b"E"
DATA = b"D"
DELTA = b"T"
CHUNK = b"C"
END = b"Z"
FILE = b"F"
"""A whole file of at most CHUNK_SIZE bytes and no holes in one frame: DATA, its one CHUNK
and END (protocol 7). Three frames per small file cost each side about a tenth of its CPU
in a full copy of many small files."""
FRAME_TYPES = (ENTRY, DATA, DELTA, CHUNK, END, FILE)

CODEC_RAW = 0
CODEC_ZLIB = 1
CODEC_ZSTD = 2
"""The next piece of the data stream's one zstd stream (protocol 6): chunks decode in order,
each flushed to a block boundary, so small files compress against what came before them
(the Debian tree: 2.36 against 2.10 as independent frames, at level 3)."""
CODEC_ZERO = 3  # data is a u64 length of zeros: a hole or zero run inside a delta
ZSTD_WINDOW_MAX = 8 * 1024 * 1024
"""The largest zstd window a receiver accepts: it holds one per data stream."""

MAX_FRAME = 64 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
DELTA_MIN_SIZE = 4 * 1024 * 1024
BATCH_ENTRIES = 2000
# the agent ends a batch after the entry that reaches either
BATCH_BYTES = 2 * 1024 * 1024
BATCH_XATTRS = 65536
# what a receiver accepts: a manifest's entries are kept until its data arrives, so their
# number and size are bounded, and their xattrs too (as objects, 2-byte names took 15 times
# their bytes: 1 GB for one manifest). Linux caps an xattr value at 64 KiB (XATTR_SIZE_MAX)
# and a file's names, NULs included, at 64 KiB (XATTR_LIST_MAX).
MAX_MANIFEST_ENTRIES = 10 * BATCH_ENTRIES
MAX_MANIFEST_BYTES = BATCH_BYTES + MAX_FRAME
MAX_XATTR_VALUE = 64 * 1024
MAX_XATTR_NAMES = 64 * 1024
MAX_MANIFEST_XATTRS = BATCH_XATTRS + MAX_XATTR_NAMES // 2  # one more entry of 1-byte names
MAX_FILE_SIZE = 1 << 50
"""1 PiB. The END hash of a file costs its block count, holes included (FileDigest): about
20 s per side at this size, a day at the 2^62 a size field allows. ext4 holds at most 16 TiB."""
# a directory's child names go in slices of about this many bytes, one entry each, so that
# a directory of any size fits in frames (one frame held ~3 million 20-byte names)
CHILD_SLICE_BYTES = 4 * 1024 * 1024
PARTIAL_PREFIX = ".rehost-partial-"
_FS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
HASH_HEADER = "X-Rehost-Hash"

_HEADER = struct.Struct(">cI")
_CHUNK_HEAD = struct.Struct(">QB")
_FILE_HEAD = struct.Struct(">IBB")  # index, codec, the hash's length; the hash, then data
_U64 = struct.Struct(">Q")

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the source host
    _blake3 = None  # type: ignore[assignment]

try:
    from xxhash import xxh3_128 as _xxh128  # python-xxhash 2.0 or newer
except ImportError:  # pragma: no cover - depends on the source host
    _xxh128 = None  # type: ignore[misc,assignment]


class AgentError(Exception):
    """A failure the agent reports: a stable code, a message and what to do about it."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.hint = hint


class ProtocolError(ValueError):
    """A malformed, unsafe or refused request; the receiver answers 400 (409 for a conflict)
    with the code, the message and, where there is one, a hint, and logs it."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


def hold_lock(path: str) -> Tuple[int, str]:
    """flock `path` (created 0600) for this process and write its PID in it: (fd, "").
    When another process holds it, (-1, the PID that process wrote). The kernel lets go
    when the holder's process ends, kill -9 too, so a crash never leaves it held."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return -1, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    return fd, ""


SOURCE_HEADER = "X-Rehost-Source"
"""Every request says which server it comes from: `source_identity()`."""


def source_identity(root: str = "/") -> str:
    """`ID HOST`: the source's machine id (else "hostname:HOST") and its hostname.

    A receiver prepared for one source refuses another's requests, so that two servers'
    trees never mix on one destination (a config copied to a second server with its
    Destination unchanged). A machine id outlives an agent folder copied again; servers
    cloned from one template may share it, and would then not be told apart.
    """

    def first_line(*parts: str) -> str:
        try:
            with open(os.path.join(root, *parts), "rb") as f:
                text = f.readline().decode("ascii", "replace").strip()
        except OSError:
            return ""
        return "".join(c for c in text if c.isalnum() or c in ".-_")[:64]

    host = first_line("etc", "hostname") or first_line("proc", "sys", "kernel", "hostname")
    host = host or "unknown"
    machine = first_line("etc", "machine-id") or first_line("var", "lib", "dbus", "machine-id")
    return "{} {}".format("machine-id:" + machine if machine else "hostname:" + host, host)


# --- frames -------------------------------------------------------------------------------


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def chunk_head(offset: int, codec: int, length: int) -> bytes:
    """The first bytes of a CHUNK frame whose data (`length` bytes) follows them."""
    return _HEADER.pack(CHUNK, _CHUNK_HEAD.size + length) + _CHUNK_HEAD.pack(offset, codec)


def chunk_frame(offset: int, codec: int, data: bytes) -> bytes:
    return b"".join((chunk_head(offset, codec, len(data)), data))  # one copy of the data


def zero_frame(offset: int, length: int) -> bytes:
    return chunk_frame(offset, CODEC_ZERO, _U64.pack(length))


def decode_chunk(payload: bytes) -> Tuple[int, int, memoryview]:
    """(offset, codec, data) of a CHUNK frame's payload; data is a view, not a copy."""
    if len(payload) < _CHUNK_HEAD.size:
        raise ProtocolError("BAD_FRAME", "short chunk frame")
    offset, codec = _CHUNK_HEAD.unpack_from(payload)
    return offset, codec, memoryview(payload)[_CHUNK_HEAD.size :]


def file_head(index: int, codec: int, digest: str, length: int) -> bytes:
    """The first bytes of a FILE frame whose data (`length` bytes) follows them."""
    hexed = digest.encode("ascii")
    return (
        _HEADER.pack(FILE, _FILE_HEAD.size + len(hexed) + length)
        + _FILE_HEAD.pack(index, codec, len(hexed))
        + hexed
    )


def decode_file(payload: bytes) -> Tuple[int, int, str, memoryview]:
    """(index, codec, hash, data) of a FILE frame's payload; data is a view, not a copy."""
    if len(payload) < _FILE_HEAD.size:
        raise ProtocolError("BAD_FRAME", "short file frame")
    index, codec, length = _FILE_HEAD.unpack_from(payload)
    start = _FILE_HEAD.size + length
    digest = payload[_FILE_HEAD.size : start]
    if len(digest) != length or not digest.isalnum():
        raise ProtocolError("BAD_FRAME", "a file frame's hash is not hex")
    return index, codec, digest.decode("ascii"), memoryview(payload)[start:]


def zero_length(data: Union[bytes, memoryview]) -> int:
    if len(data) != _U64.size:
        raise ProtocolError("BAD_FRAME", "bad zero chunk")
    return int(_U64.unpack(data)[0])


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    parts = []  # type: List[bytes]
    while n > 0:
        block = stream.read(n)
        if not block:
            raise ProtocolError("BAD_FRAME", "stream ended inside a frame")
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


_SLAB = 256 * 1024  # bytes read ahead for small frames
_LARGE = 64 * 1024  # a payload this large, not yet buffered, is read on its own (uncopied)


def read_frames(stream: IO[bytes]) -> Iterator[Tuple[bytes, bytes]]:
    """Yield (type, payload) until the stream ends cleanly between frames.

    Small frames are cut out of reads of up to _SLAB bytes (a few stream reads per hundred
    frames rather than three per frame); a large payload that starts a read is read as one
    piece. `stream.read(n)` may return fewer than n bytes, and must not wait for more than
    the sender has committed to (a chunked body's current chunk, a Content-Length body).
    """
    buf = b""
    pos = 0
    while True:
        avail = len(buf) - pos
        if avail == 0:
            buf, pos = stream.read(_HEADER.size), 0
            if not buf:
                return
            if len(buf) < _HEADER.size:
                buf += _read_exact(stream, _HEADER.size - len(buf))
        elif avail < _HEADER.size:
            buf, pos = buf[pos:] + _read_exact(stream, _HEADER.size - avail), 0
        kind, length = _HEADER.unpack_from(buf, pos)
        if kind not in FRAME_TYPES:
            raise ProtocolError("BAD_FRAME", f"unknown frame type {kind!r}")
        if length > MAX_FRAME:
            raise ProtocolError("BAD_FRAME", f"frame of {length} bytes is too large")
        pos += _HEADER.size
        avail = len(buf) - pos
        if avail >= length:
            payload = buf[pos : pos + length]
            pos += length
        elif avail == 0 and length >= _LARGE:
            payload = _read_exact(stream, length)
            buf, pos = b"", 0
        else:
            more = stream.read(max(length - avail, _SLAB))
            if not more:
                raise ProtocolError("BAD_FRAME", "stream ended inside a frame")
            buf = buf[pos:] + more
            if len(buf) < length:
                buf += _read_exact(stream, length - len(buf))
            payload = buf[:length]
            pos = length
        yield kind, payload


def decode_json(payload: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except ValueError as e:
        raise ProtocolError("BAD_FRAME", f"frame is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("BAD_FRAME", "frame JSON is not an object")
    return obj


# --- paths --------------------------------------------------------------------------------


def path_to_wire(path: bytes) -> str:
    """A relative path as bytes → the str carried in JSON (undecodable bytes escaped)."""
    return path.decode("utf-8", "surrogateescape")


def wire_to_path(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def split_relpath(text: object) -> List[bytes]:
    """Validate a wire path (str) and return its components ("" is the filesystem's root)."""
    if not isinstance(text, str):
        raise ProtocolError("BAD_PATH", "path is not a string")
    try:
        raw = wire_to_path(text)
    except UnicodeError:
        raise ProtocolError("BAD_PATH", "path is not encodable") from None
    return split_path(raw)


def split_path(raw: bytes) -> List[bytes]:
    """Validate a relative path and return its components (b"" is the filesystem's root).

    Rejects absolute paths, "." and ".." components, empty components, NUL bytes and names
    longer than 255 bytes: nothing that could name a place outside the root.
    """
    if not raw:
        return []
    if b"\0" in raw:
        raise ProtocolError("BAD_PATH", f"path contains NUL: {raw!r}")
    if raw.startswith(b"/"):
        raise ProtocolError("BAD_PATH", f"absolute path: {raw!r}")
    parts = raw.split(b"/")
    if b"" in parts or b"." in parts or b".." in parts:
        raise ProtocolError("BAD_PATH", f"bad path component in {raw!r}")
    if len(raw) > 255 and max(map(len, parts)) > 255:
        raise ProtocolError("BAD_PATH", f"name longer than 255 bytes in {raw!r}")
    return parts


# --- entries ------------------------------------------------------------------------------
# An ENTRY payload is a fixed head, then length-prefixed byte strings (docs/online-protocol.md).
# Binary rather than JSON: encoding and decoding a JSON entry took ~3.5 and ~3 us, a
# fifth of each side's CPU in an incremental pass, and paths, link targets and xattr
# values go as the bytes they are, without escaping or base64.

# i, t, flags, m, u, g, s, mt, at, n, r, length of p
_ENTRY_HEAD = struct.Struct(">IcBIIIQqqIQI")
_FLAG_EXCLUDED = 1
_FLAG_MORE = 2  # more of this directory's child names follow, in the next entry
_FLAG_CONTINUED = 4  # this entry continues the previous entry's child names
_FLAG_UNLISTED = 8  # the agent could not list this directory: nothing in it is deleted
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_NO_XATTRS = _U16.pack(0)
_KIND_NAMES = {kind.encode(): kind for kind in "fdlhcbps"}


def encode_entry(entry: Dict[str, Any]) -> bytes:
    """The ENTRY frame of a walk entry.

    Keys: "i", "t", "p" (bytes) and, where they apply, "m", "u", "g", "s", "mt", "at", "n"
    (st_nlink of a multiply linked file), "r" (rdev), "e" (an excluded directory), "l" (a
    symlink's target, bytes), "h" (a hardlink's first path, bytes), "x" ({name: bytes}),
    "c" (a directory's child names, bytes), "more" and "cont" (a slice of them: more follow,
    and this one continues the last; see child_slices), "unlisted" (a directory that could
    not be listed). Nothing is validated: the receiver does that.
    """
    kind = entry["t"]
    path = entry["p"]
    flags = 0
    if kind == "d":
        flags = (
            (_FLAG_EXCLUDED if entry.get("e") else 0)
            | (_FLAG_MORE if entry.get("more") else 0)
            | (_FLAG_CONTINUED if entry.get("cont") else 0)
            | (_FLAG_UNLISTED if entry.get("unlisted") else 0)
        )
    parts = [
        _ENTRY_HEAD.pack(
            entry["i"], kind.encode("ascii"), flags,
            entry.get("m", 0), entry.get("u", 0), entry.get("g", 0), entry.get("s", 0),
            entry.get("mt", 0), entry.get("at", 0), entry.get("n", 0), entry.get("r", 0),
            len(path),
        ),
        path,
    ]  # fmt: skip
    if kind in ("l", "h"):
        target = entry[kind]
        parts += [_U32.pack(len(target)), target]
    xattrs = entry.get("x")
    if xattrs:
        parts.append(_U16.pack(len(xattrs)))
        for name, value in xattrs.items():
            raw = name.encode("utf-8", "surrogateescape")
            parts += [_U8.pack(len(raw)), raw, _U32.pack(len(value)), value]
    else:
        parts.append(_NO_XATTRS)
    if kind == "d":
        children = entry.get("c") or []
        parts.append(_U32.pack(len(children)))
        for child in children:
            parts += [_U8.pack(len(child)), child]
    payload = b"".join(parts)
    return _HEADER.pack(ENTRY, len(payload)) + payload


def child_slices(entry: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """A directory's entry as entries whose child names take at most CHILD_SLICE_BYTES
    each: all but the last say "more", all but the first "cont". Any other entry as it is."""
    names = entry.get("c")
    if entry["t"] != "d" or not names or len(names) * 256 <= CHILD_SLICE_BYTES:
        yield entry  # (a name takes at most 256 bytes)
        return
    start = size = 0
    for k, name in enumerate(names):
        size += len(name) + 1
        if size > CHILD_SLICE_BYTES and k > start:
            yield dict(entry, c=names[start:k], more=True, cont=start > 0)
            start, size = k, len(name) + 1
    if start == 0:
        yield entry
    else:
        yield dict(entry, c=names[start:], more=False, cont=True)


def _field(payload: bytes, pos: int, size: struct.Struct) -> Tuple[bytes, int]:
    """A length-prefixed byte string at `pos`, and the position after it."""
    start = pos + size.size
    end = start + size.unpack_from(payload, pos)[0]
    if end > len(payload):
        raise ProtocolError("BAD_ENTRY", "an entry ends inside a field")
    return payload[start:end], end


class ChildNames:
    """A directory's child names, validated, left in the frame they came in.

    A list of 1-byte names costs 2 bytes each on the wire and ~100 as Python objects in a
    list and a set: one 64 MiB frame would take GBs. Kept as the frame, it costs the frame,
    and the names are cut out in slabs of a few thousand as they are used.
    """

    __slots__ = ("_count", "_only", "_payload", "_start")
    _SLAB = 4096

    def __init__(self, payload: bytes, start: int, count: int) -> None:
        self._payload = payload
        self._start = start
        self._count = count
        self._only: Optional[List[bytes]] = None  # a list of one slab, kept as cut

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        for slab in self.slabs():
            yield from slab

    def slabs(self) -> Iterator[List[bytes]]:
        if self._only is not None:
            yield self._only
            return
        for names, _ in self._cut_all():
            yield names

    def _cut_all(self) -> Iterator[Tuple[List[bytes], int]]:
        """Each slab, and the position after it (past the end if the frame is cut short)."""
        pos, left = self._start, self._count
        while left:
            names, pos = self._cut(pos, min(left, self._SLAB))
            left -= len(names)
            yield names, pos

    def _cut(self, pos: int, count: int) -> Tuple[List[bytes], int]:
        """`count` names from `pos`, and the position after them (past the end if cut short)."""
        payload = self._payload
        names = []  # type: List[bytes]
        for _ in range(count):
            start = pos + 1
            pos = start + payload[pos]
            names.append(payload[start:pos])
        return names, pos

    @classmethod
    def decode(cls, payload: bytes, pos: int) -> Tuple["ChildNames", int]:
        """The "c" field at `pos` (a u32 count of u8-length names), all validated."""
        count = _U32.unpack_from(payload, pos)[0]
        names = cls(payload, pos + _U32.size, count)
        pos = names._start
        for slab, after in names._cut_all():
            pos = after
            joined = b"/".join(slab)
            if (
                joined.count(b"/") != len(slab) - 1
                or b"\0" in joined
                or b"" in slab
                or b"." in slab
                or b".." in slab
            ):
                bad = next(n for n in slab if n in (b"", b".", b"..") or b"/" in n or b"\0" in n)
                raise ProtocolError("BAD_PATH", f"bad child name {bad!r}")
            if len(slab) == count:
                names._only = slab  # most directories: no second cut when applied
        if pos > len(payload):
            raise ProtocolError("BAD_ENTRY", "an entry ends inside a field")
        return names, pos


def decode_entry(payload: bytes) -> Dict[str, Any]:
    """Decode and validate an ENTRY payload once, for the receiver.

    Gives the keys of encode_entry, every number present (0 when absent), "e", "more",
    "cont" and "unlisted" as booleans, "p" as the wire str (for logs and the journal) with
    "parts" its validated components, "l" as bytes, "h" as validated components, "x" as
    {str: bytes} and "c" as validated ChildNames.
    """
    try:
        i, t, flags, m, u, g, s, mt, at, n, r, plen = _ENTRY_HEAD.unpack_from(payload)
        kind = _KIND_NAMES.get(t)
        if kind is None:
            raise ProtocolError("BAD_ENTRY", f"bad entry type {t!r}")
        pos = _ENTRY_HEAD.size + plen
        path = payload[_ENTRY_HEAD.size : pos]
        if pos > len(payload):
            raise ProtocolError("BAD_ENTRY", "an entry ends inside its path")
        entry = {
            "i": i, "t": kind, "m": m, "u": u, "g": g, "s": s, "mt": mt, "at": at, "n": n,
            "r": r, "e": bool(flags & _FLAG_EXCLUDED), "more": bool(flags & _FLAG_MORE),
            "cont": bool(flags & _FLAG_CONTINUED), "unlisted": bool(flags & _FLAG_UNLISTED),
            "p": path.decode("utf-8", "surrogateescape"), "parts": split_path(path), "x": {},
        }  # type: Dict[str, Any]  # fmt: skip
        if kind == "f" and s > MAX_FILE_SIZE:
            raise ProtocolError("BAD_ENTRY", f"a file of {s} bytes (rehost takes up to 1 PiB)")
        if len(payload) == pos + 2 and kind in "fcbps" and payload.endswith(_NO_XATTRS):
            return entry  # the common case: a file without xattrs
        if kind == "l":
            target, pos = _field(payload, pos, _U32)
            if not target or b"\0" in target:
                raise ProtocolError("BAD_ENTRY", "bad symlink target")
            entry["l"] = target
        elif kind == "h":
            target, pos = _field(payload, pos, _U32)
            entry["h"] = split_path(target)
        count = _U16.unpack_from(payload, pos)[0]
        pos += _U16.size
        names = 0
        for _ in range(count):
            name, pos = _field(payload, pos, _U8)
            value, pos = _field(payload, pos, _U32)
            names += len(name) + 1
            if len(value) > MAX_XATTR_VALUE or names > MAX_XATTR_NAMES:
                raise ProtocolError("BAD_ENTRY", "xattrs over Linux's 64 KiB of names or value")
            entry["x"][name.decode("utf-8", "surrogateescape")] = value
        if kind == "d":
            entry["c"], pos = ChildNames.decode(payload, pos)
    except (struct.error, IndexError):
        raise ProtocolError("BAD_ENTRY", "an entry ends inside a field") from None
    if pos != len(payload):
        raise ProtocolError("BAD_ENTRY", "trailing bytes after an entry")
    return entry


def valid_fs_id(fs_id: Any) -> bool:
    """Whether a filesystem id is a plain name: the receiver mounts the filesystem, and keeps
    its journal, under that name in its state dir (an id of "../../etc" once mounted over
    the rescue system's /etc)."""
    return isinstance(fs_id, str) and _FS_ID.match(fs_id) is not None


# --- connections ----------------------------------------------------------------------

# Seconds: keepalive probes after this much silence, this far apart, this many unanswered.
# A connection that waits (for an answer, or for the next request's body) then breaks about
# a minute after a network cut; the peer's kernel answers probes however busy its process
# is. (No TCP_USER_TIMEOUT: it would also cut a sender whose peer stops reading for that
# long, as the receiver does while it hashes a large file for a manifest's answer.)
KEEPALIVE = (30, 10, 3)

SILENCE_SECONDS = 24 * 3600.0
"""How long either side waits on a connection whose peer is alive but silent: a backstop.
Keepalives (and the agent's watch while it sends) notice a dead peer in about a minute;
a live one may say nothing for as long as it takes to read a large file for a delta (the
receiver, to answer a manifest; the agent, over unchanged blocks): 3.3 h for 6 TB at
500 MB/s. The 600 s this was before failed every pass over a file of more than ~300 GB
with few changes."""


def keep_alive(sock: Any) -> None:
    """Make a waiting connection notice a network cut (see KEEPALIVE), where the OS can."""
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


# --- file content -------------------------------------------------------------------


def data_segments(fd: int, size: int, start: int = 0) -> List[Tuple[int, int]]:
    """The data ranges of a file from `start` to `size` (holes left out)."""
    if size < 65536:
        return [(start, size)] if size > start else []
    out = []  # type: List[Tuple[int, int]]
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return [(start, size)]
        if data >= size:
            break
        end = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, end))
        pos = end
    return out


def iter_data(fd: int, size: int, block: int, start: int = 0) -> Iterator[Tuple[int, bytes]]:
    """(offset, data) pieces covering only the data segments from `start` to `size`, each
    within one aligned block (FileDigest takes them so); short where the file shrank."""
    for first, end in data_segments(fd, size, start):
        off = first
        while off < end:
            stop = min(end, off - off % block + block)
            data = os.pread(fd, stop - off, off)
            if data:
                yield off, data
            off = stop


# --- hashing ------------------------------------------------------------------------------


def hash_algorithms() -> List[str]:
    """The algorithms this side has, fastest first.

    XXH3-128 (rsync's file checksum) runs at ~20 GB/s here against blake3's ~3 and
    sha256's ~1: each checksum detects corruption and a source that changed while it was
    read; none is meant to resist forged content, which the pinned TLS link keeps out.
    """
    found = ["xxh128"] if _xxh128 is not None else []
    if _blake3 is not None:
        found.append("blake3")
    return [*found, "sha256"]


def new_hash(alg: str) -> Any:
    if alg == "xxh128":
        if _xxh128 is None:
            raise ProtocolError("BAD_HASH", "xxh128 is not available here")
        return _xxh128()
    if alg == "blake3":
        if _blake3 is None:
            raise ProtocolError("BAD_HASH", "blake3 is not available here")
        return _blake3.blake3()
    if alg == "sha256":
        return hashlib.sha256()
    raise ProtocolError("BAD_HASH", f"unknown hash algorithm {alg!r}")


HASH_HEX = 32  # hex digits of a block hash


def block_hash(alg: str, data: Union[bytes, bytearray, memoryview]) -> str:
    """The hash of one delta block: 128 bits are plenty next to the whole-file hash."""
    h = new_hash(alg)
    h.update(data)
    return str(h.hexdigest())[:HASH_HEX]


@functools.lru_cache(maxsize=32)
def zero_block_hash(alg: str, n: int) -> str:
    """block_hash of n zero bytes: holes and zero blocks, without hashing them each time."""
    h = new_hash(alg)
    feed_zeros(h, n)
    return str(h.hexdigest())[:HASH_HEX]


_ZEROS = bytes(CHUNK_SIZE)


def feed_zeros(hasher: Any, n: int) -> None:
    """Hash n zero bytes, 1 MiB at a time."""
    while n > 0:
        step = min(n, CHUNK_SIZE)
        hasher.update(_ZEROS[:step])
        n -= step


def is_zero(data: Union[bytes, memoryview]) -> bool:
    """Whether a piece of at most CHUNK_SIZE is all zeros (its last byte first: data rarely
    ends in one)."""
    return data[-1:] in (b"", b"\0") and data == _ZEROS[: len(data)]


def block_digests(fd: int, size: int, block: int, alg: str) -> Iterator[Tuple[int, str]]:
    """(offset, block hash) per aligned block of the file.

    Read in pieces of at most CHUNK_SIZE, hashed as they come: a delta block can be of any
    size (128 MiB for a 1 TiB file), and neither side may hold one whole. Holes cost nothing
    but the zeros hashed inside a block that also holds data.
    """
    k = 0  # the next block to yield
    hasher = None  # type: Any  # block k's, once a piece of it has come
    pos = 0  # where block k's last piece ended

    def finished() -> str:  # block k's hash, the zeros after its last piece included
        feed_zeros(hasher, min(k * block + block, size) - pos)
        return str(hasher.hexdigest())[:HASH_HEX]

    for off, data in iter_data(fd, size, min(block, CHUNK_SIZE)):
        if off // block != k and hasher is not None:
            yield k * block, finished()
            k, hasher = k + 1, None
        while k < off // block:
            yield k * block, zero_block_hash(alg, min(block, size - k * block))
            k += 1
        if hasher is None:
            hasher, pos = new_hash(alg), k * block
        feed_zeros(hasher, off - pos)
        hasher.update(data)
        pos = off + len(data)
    if hasher is not None:
        yield k * block, finished()
        k += 1
    for off in range(k * block, size, block):
        yield off, zero_block_hash(alg, min(block, size - off))


def blocks_digest(alg: str, hashes: List[str]) -> str:
    """A DELTA file's END hash: over its block hashes, not its bytes, so that neither side
    reads the whole file again for it; the receiver knows the blocks it kept (it hashed
    them for the manifest's answer) and hashes the ones it receives."""
    h = new_hash(alg)
    h.update("".join(hashes).encode("ascii"))
    return str(h.hexdigest())


class FileDigest:
    """END's hash of a whole file (a DATA file), fed its data in order.

    A file of at most one block (CHUNK_SIZE) hashes its bytes. A larger one hashes, in
    order, the block_hash of each aligned block, as blocks_digest does; what is never fed
    is zeros. So a hole costs its block count, not its bytes: hashing the zeros of a 1 TiB
    sparse file (a lastlog where uids run to 2^32) took 15 s on each side with XXH3, and ten
    minutes with sha256, the only hash of an agent on a bare python3.
    """

    __slots__ = ("alg", "blocks", "hash", "next", "part", "pos", "size", "small")

    def __init__(self, alg: str, size: int) -> None:
        self.alg = alg
        self.size = size
        self.small = size <= CHUNK_SIZE
        self.blocks = -(-size // CHUNK_SIZE)
        self.hash = new_hash(alg)
        self.next = 0  # the first block not yet hashed
        self.part: Optional[bytearray] = None  # block `next`, while fed in pieces
        self.pos = 0  # where the last piece ended

    def feed(self, offset: int, data: Union[bytes, bytearray, memoryview]) -> bool:
        """Take the piece at `offset`; False, taking nothing, unless it lies within one
        block and after the pieces before it."""
        if self.small:  # most files: their bytes, gaps as zeros
            if offset < self.pos or offset + len(data) > self.size:
                return False
            if offset > self.pos:
                self.hash.update(bytes(offset - self.pos))
            self.hash.update(data)
            self.pos = offset + len(data)
            return True
        k, within = divmod(offset, CHUNK_SIZE)
        length = min(CHUNK_SIZE, self.size - k * CHUNK_SIZE)
        if offset < self.pos or k >= self.blocks or within + len(data) > length:
            return False
        if self.part is not None and k != self.next:
            self._block(self.part)
        if self.part is None and within == 0 and len(data) == length:
            self._zeros(k)
            self._block(data)  # a whole block, uncopied
        else:
            if self.part is None:
                self._zeros(k)
                self.part = bytearray(length)
            self.part[within : within + len(data)] = data
        self.pos = offset + len(data)
        return True

    def _block(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Hash block `next`, whole."""
        self.hash.update(block_hash(self.alg, data).encode("ascii"))
        self.next += 1
        self.part = None

    def _zeros(self, upto: int) -> None:
        """Hash blocks next..upto-1 as zeros, in bulk: only the last block can be short."""
        full = min(upto, self.size // CHUNK_SIZE) - self.next
        if full > 0:
            zero = zero_block_hash(self.alg, CHUNK_SIZE).encode("ascii")
            for done in range(0, full, 65536):
                self.hash.update(zero * min(65536, full - done))
            self.next += full
        if self.next < upto:  # the file's short last block
            self._block(bytes(self.size - self.next * CHUNK_SIZE))

    def hexdigest(self) -> str:
        if self.small:
            if self.pos < self.size:  # zeros after the last piece
                self.hash.update(bytes(self.size - self.pos))
                self.pos = self.size
        else:
            if self.part is not None:
                self._block(self.part)
            self._zeros(self.blocks)
        return str(self.hash.hexdigest())


def whole_digest(alg: str, size: int, data: Union[bytes, memoryview]) -> str:
    """FileDigest of a file of `size` bytes whose data from 0 is `data` (a FILE frame's)."""
    digest = FileDigest(alg, size)
    digest.feed(0, data)
    return digest.hexdigest()


def file_digest(fd: int, size: int, alg: str) -> str:
    """FileDigest of what a file holds, re-read."""
    digest = FileDigest(alg, size)
    for off, data in iter_data(fd, size, CHUNK_SIZE):
        digest.feed(off, data)
    return digest.hexdigest()


def delta_block_size(size: int) -> int:
    """Blocks of 128 KiB, doubled until a file has at most 8192 of them."""
    block = 128 * 1024
    while size > block * 8192:
        block *= 2
    return block


def partial_name(name: bytes) -> bytes:
    """The name a file is received under before it is renamed into place (fits 255 bytes)."""
    return PARTIAL_PREFIX.encode() + hashlib.sha256(name).hexdigest()[:32].encode()


def required_int(obj: Dict[str, Any], key: str) -> int:
    """An integer field of a JSON frame (END's "i")."""
    value = obj.get(key)
    if value is None:
        raise ProtocolError("BAD_FRAME", f"frame lacks {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("BAD_FRAME", f"field {key!r} is not an integer")
    return value


# -- disk sizing -------------------------------------------------------------------------
# The receiver lays the source's partitions out on its disks with these rules
# (receiver/disks.py plan_disk), and the agent's capacity precheck sums them per disk: one
# definition, so that the precheck says OK exactly when the receiver's prepare fits.

MiB = 1 << 20
FS_MARGIN = 64 * MiB  # per filesystem: metadata, journal, reserved blocks
USED_GROWTH = 1.1  # used bytes grow ~10% on a fresh filesystem (block rounding, inodes)
FS_MIN = {"xfs": 300 * MiB, "ext2": 8 * MiB, "ext3": 8 * MiB, "ext4": 8 * MiB}  # mkfs floors
SWAP_MIN = 64 * MiB
GROWABLE = ("ext2", "ext3", "ext4", "xfs")
DOS_EXTENDED = ("5", "f", "85")
MBR_MAX_SECTORS = 2**32 - 1  # an MBR entry's 32-bit start and size


def align_up(n: int) -> int:
    return -(-n // MiB) * MiB


def align_down(n: int) -> int:
    return n // MiB * MiB


def is_extended(label: str, part: Dict[str, Any]) -> bool:
    """An MBR extended partition: a container, sized by the logical partitions in it."""
    return label == "dos" and str(part["type"]).lower() in DOS_EXTENDED


def is_growable(part: Dict[str, Any]) -> bool:
    """An ext/xfs filesystem whose files are copied: it may shrink to its data, or grow."""
    return part.get("fs") in GROWABLE and bool(part.get("fs_id"))


def partition_minimum(part: Dict[str, Any]) -> int:
    """The least the receiver makes of a partition: a growable filesystem its used bytes
    plus margin (not below mkfs's floor), swap 64 MiB; the rest (ESP, BIOS boot, unmounted
    filesystems) hold what is not copied, so they keep their size."""
    size = int(part["size"])
    if is_growable(part):
        used = int(int(part.get("used", size)) * USED_GROWTH)
        return min(size, max(align_up(used + FS_MARGIN), FS_MIN[part["fs"]]))
    if part.get("fs") == "swap":
        return min(size, SWAP_MIN)
    return size


def table_overhead(label: str, partitions: List[Dict[str, Any]]) -> int:
    """Bytes of a disk outside its partitions (extended ones left out): the first MiB, a
    MiB before each logical partition for its EBR, and the last MiB for GPT's backup."""
    logical = sum(1 for p in partitions if label == "dos" and int(p["number"]) > 4)
    return MiB + logical * MiB + (MiB if label == "gpt" else 0)


def usable_bytes(have: int, label: str, sector: int) -> int:
    """What partitions may span of a `have`-byte disk: whole MiBs, and with an MBR table
    no further than its 2^32 sectors reach (the rest of the disk stays unused)."""
    if label == "dos":
        have = min(have, MBR_MAX_SECTORS * sector)
    return align_down(have)


def disk_need(disk: Dict[str, Any], label: str) -> int:
    """The usable bytes (see usable_bytes) the receiver needs to lay out a source disk of
    the layout: every partition at its minimum, MiB-aligned, plus the table's overhead."""
    real = [p for p in disk.get("partitions", []) if not is_extended(label, p)]
    return sum(align_up(partition_minimum(p)) for p in real) + table_overhead(label, real)
