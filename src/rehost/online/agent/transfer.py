"""File-level sync of one source filesystem to the receiver.

The walk stays on one filesystem (st_dev), lists each directory before its children and
sends entries in batches: one manifest POST per batch, whose answer names the files the
receiver lacks, then one streamed DATA POST with all of them. No per-file round trips, so
small files cost a few frames each; large changed files go as block deltas; holes are never
read or sent. A broken connection retries the batch: the receiver's quick check skips what
already landed and its partial files resume by delta.
"""

import errno
import fnmatch
import logging
import os
import queue
import re
import stat
import threading
import time
import zlib
from array import array
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

from rehost.online.protocol import (
    BATCH_BYTES,
    BATCH_ENTRIES,
    BATCH_XATTRS,
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZLIB,
    CODEC_ZSTD,
    DATA,
    DELTA,
    END,
    MAX_FILE_SIZE,
    MAX_FRAME,
    AgentError,
    FileDigest,
    block_digests,
    blocks_digest,
    child_slices,
    chunk_frame,
    chunk_head,
    data_segments,
    encode_entry,
    encode_frame,
    file_head,
    is_zero,
    iter_data,
    path_to_wire,
    whole_digest,
    zero_frame,
)

try:
    import zstandard as _zstd

    if not hasattr(_zstd, "COMPRESSOBJ_FLUSH_BLOCK"):  # too old to stream (before 0.9)
        _zstd = None  # type: ignore[assignment]
except ImportError:  # pragma: no cover - depends on the source host
    _zstd = None  # type: ignore[assignment]

Log = Optional[Callable[[int, str], None]]
"""Told (a logging level, a message): warnings are what an operator should see at once."""
_T = TypeVar("_T")
_BATCH_ATTEMPTS = 5
_LINK_WINDOW = 0.5  # seconds of streaming per compression decision
# the first decision comes sooner: until then "auto" compresses, which on a fast link costs
# CPU for nothing (0.5 s of it was a tenth of the agent's CPU in a 1 GiB full copy)
_FIRST_WINDOW = 0.1
_FAST_LINK = 64 * 1024 * 1024  # file bytes/s: above this, compressing costs more than it saves
_PREFETCH = 2  # batches walked ahead while the receiver works on the current one
_UNJOINED = 64 * 1024  # chunk data from this size on is sent after its head, not copied
# a frame, or a large CHUNK frame as (head, data) that the client writes without joining
Frame = Union[bytes, Tuple[bytes, bytes]]
_KINDS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}


class _Compressor:
    """Compression of a data stream's chunks: with zstandard, one zstd stream per data
    stream (CODEC_ZSTD: small files compress against what came before them); else zlib per
    chunk, kept only when it saves at least 10%.

    In "auto" mode a run of chunks that do not compress (media, archives) makes it try only
    every 16th chunk, so incompressible data costs little CPU; and compression is used only
    while the link is the bottleneck: over each half second spent streaming data (summed
    over a pass's data streams, most of which are shorter; the first decision comes after
    a tenth of a second, compressing meanwhile), the agent must have spent most
    of its time waiting to write (socket or bandwidth limit) while moving under _FAST_LINK
    bytes/s of file data. On a fast LAN the CPUs are the bottleneck, and compressing only
    slows both ends down.
    """

    def __init__(self, mode: str, client: Any = None) -> None:
        if mode not in ("auto", "zstd", "off"):
            raise AgentError("CONFIG_INVALID", "Compression must be auto, zstd or off, not " + mode)
        if mode == "zstd" and _zstd is None:
            raise AgentError(
                "COMPRESSION_UNAVAILABLE",
                "Compression is zstd but the zstandard module is not importable here",
                'use "auto" (zlib) or install python3-zstandard on the source',
            )
        self.mode = mode
        # level 3 (zstd's default): "auto" compresses only on slow links, where the ratio pays
        self.zstd = _zstd.ZstdCompressor(level=3) if _zstd is not None else None
        self.stream = None  # type: Any  # the data stream's zstd compressobj
        self.misses = 0
        self.skipped = 0
        self.client = client
        self.slow_link = True
        self.decided = False
        # (seconds, client.send_wait, client.payload_bytes) streamed since the last decision
        # by streams that ended, and the same counters where the current stream started
        self.window = (0.0, 0.0, 0)
        self.mark = None  # type: Optional[Tuple[float, float, int]]

    def _counters(self) -> Tuple[float, float, int]:
        return (time.monotonic(), self.client.send_wait, self.client.payload_bytes)

    def new_stream(self) -> None:
        """A data stream starts: the link is judged only on time spent streaming, and
        its zstd chunks are one stream, as the receiver decodes them."""
        self.stream = None
        if self.client is not None:
            self.mark = self._counters()

    def end_stream(self) -> None:
        self.stream = None
        if self.client is not None and self.mark is not None:
            self.window = self._since_decision()
            self.mark = None

    def _since_decision(self) -> Tuple[float, float, int]:
        assert self.mark is not None
        now = self._counters()
        return (
            self.window[0] + now[0] - self.mark[0],
            self.window[1] + now[1] - self.mark[1],
            self.window[2] + now[2] - self.mark[2],
        )

    def _link_is_slow(self) -> bool:
        if self.client is None or self.mark is None:
            return self.slow_link
        seconds, waited, payload = self._since_decision()
        if seconds >= (_LINK_WINDOW if self.decided else _FIRST_WINDOW):
            self.slow_link = waited / seconds >= 0.5 and payload / seconds < _FAST_LINK
            self.decided = True
            self.window = (0.0, 0.0, 0)
            self.mark = self._counters()
        return self.slow_link

    def pack(self, data: bytes) -> Tuple[int, bytes]:
        if self.mode == "off" or len(data) < 64:
            return CODEC_RAW, data
        if self.mode == "auto" and not self._link_is_slow():
            return CODEC_RAW, data
        if self.mode == "auto" and self.misses >= 8:
            self.skipped += 1
            if self.skipped % 16:
                return CODEC_RAW, data
        if self.zstd is not None:
            if self.stream is None:
                self.stream = self.zstd.compressobj()
            packed = self.stream.compress(data) + self.stream.flush(_zstd.COMPRESSOBJ_FLUSH_BLOCK)
            self.misses = 0 if len(packed) <= len(data) * 0.9 else self.misses + 1
            # the receiver's decoder must see what the stream has seen: it goes as zstd
            # either way (zstd stores a block that does not compress, for 3 bytes)
            return CODEC_ZSTD, packed
        packed = zlib.compress(data, 1)
        if len(packed) <= len(data) * 0.9:
            self.misses = 0
            return CODEC_ZLIB, packed
        self.misses += 1
        return CODEC_RAW, data


def _matcher(patterns: List[str]) -> Callable[[str], bool]:
    """One regex for all the patterns: fnmatch per pattern per path showed in the walk's
    profile (28,000 paths × a dozen default excludes)."""
    if not patterns:
        return lambda path: False
    regex = re.compile("|".join(fnmatch.translate(p) for p in patterns))
    return lambda path: regex.match(path) is not None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_PATH_MAX = 4096  # what the kernel takes in one path, its NUL included


def _long(call: Callable[..., _T], path: bytes) -> _T:
    """call(path) for a path longer than the kernel takes (PATH_MAX, 4096 with its NUL).

    Deep trees exist (300 levels of 30-byte names is a 9 KB path), and one such path must
    not stop a migration. Its parent directory is opened a piece at a time, and `call`
    gets /proc/self/fd/N/NAME, a short path through it. (Callers test the length inline:
    a call through here for every path cost the walk 9%.)
    """
    parent, _, name = path.rpartition(b"/")
    fd = os.open(b"/" if path.startswith(b"/") else b".", _DIR_FLAGS)
    try:
        rest = parent.lstrip(b"/")
        while rest:
            cut = rest.rfind(b"/", 0, _PATH_MAX - 1) if len(rest) >= _PATH_MAX else len(rest)
            step = os.open(rest[:cut], _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = step
            rest = rest[cut + 1 :]
        return call(b"/proc/self/fd/%d/%s" % (fd, name))
    finally:
        os.close(fd)


def _xattrs(path: Union[bytes, int], st: Any) -> Dict[str, bytes]:
    """The extended attributes of the file the walk lstat'ed as `st`, at `path` or, for a
    directory the walk holds open, through its descriptor.

    A regular file's are read through a descriptor whose inode is checked: read by path, a
    directory swapped for a symlink between the lstat and here would lend another file's
    attributes to this entry (root's security.capability to a user's binary). Only
    where there are any: one listxattr is all most files cost. A device node or FIFO is not
    opened (opening one can act on it); its attributes are read by path.
    """
    try:
        names = os.listxattr(path, follow_symlinks=isinstance(path, int))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}
        raise
    if isinstance(path, int):
        return _xattr_values(path, names, True)
    if not names:
        return {}
    if not stat.S_ISREG(st.st_mode):
        return _xattr_values(path, names, False)
    try:
        fd = os.open(path, _PEEK_FLAGS)
    except PermissionError:  # an agent not run as root: it cannot read another's secrets
        return _xattr_values(path, names, False)
    except OSError as e:
        if e.errno in _CHANGED:
            return {}  # it changed since the lstat: the next pass sends what it is now
        raise
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return {}
        return _xattr_values(fd, os.listxattr(fd), True)
    finally:
        os.close(fd)


def _xattr_values(target: Any, names: List[str], follow: bool) -> Dict[str, bytes]:
    out = {}
    for name in sorted(names):
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                continue
            raise
        out[name] = value
    return out


class _Walker:
    """Yields (entry, absolute path) in walk order; a directory's "c" lists its sent children."""

    def __init__(self, root: str, excludes: List[str], log: Log) -> None:
        self.root = os.fsencode(root).rstrip(b"/") or b"/"
        patterns = [p for p in excludes if p not in ("", "/", "/*")]
        self.excluded = _matcher(patterns)
        self.dir_excluded = _matcher([p[:-2] for p in patterns if p.endswith("/*")])
        # each pattern's literal start: a directory whose path diverges from all of them
        # has no excluded child, and its children skip the regex
        self.literals = [re.split(r"[*?[]", p, maxsplit=1)[0] for p in patterns]
        self.log = log
        self.links = {}  # type: Dict[Tuple[int, int], bytes]
        self.changed = 0
        """Names listed but left out because they changed under the walk."""

    def _abs(self, rel: bytes) -> bytes:
        if not rel:
            return self.root
        return (self.root if self.root != b"/" else b"") + b"/" + rel

    def _may_exclude_below(self, rel: bytes) -> bool:
        prefix = _dir_prefix(rel)
        return any(lit.startswith(prefix) or prefix.startswith(lit) for lit in self.literals)

    def _entry(
        self,
        rel: bytes,
        path: bytes,
        st: os.stat_result,
        kind: str,
        dir_fd: int,
        name: Optional[bytes],
    ) -> Dict[str, Any]:
        """`name` in the directory open as `dir_fd`, or with `name` None that directory.

        A directory's attributes are read through its descriptor, a symlink's target relative
        to it. Other entries' attributes are listed by path: through /proc/self/fd/N/NAME
        it cost twice as much (2.4 µs an entry, a fifth of the walk), and `_xattrs` checks
        the inode it reads them from."""
        if kind != "d" and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                return {"p": rel, "t": "h", "h": first}
            self.links[key] = rel
        entry = {
            "p": rel,
            "t": kind,
            "m": st.st_mode,
            "u": st.st_uid,
            "g": st.st_gid,
            "s": st.st_size if kind == "f" else 0,
            "mt": st.st_mtime_ns,
            "at": st.st_atime_ns,
            "x": _attrs(path, st, dir_fd, name),
        }  # type: Dict[str, Any]
        if kind == "f":
            # which file the walk saw, for the send to check that it opens that one
            entry["id"] = _identity(st)
            if st.st_nlink > 1:
                entry["n"] = st.st_nlink
        elif kind == "l":
            assert name is not None  # only a directory is read as itself
            entry["l"] = os.readlink(name, dir_fd=dir_fd)
        elif kind in ("c", "b"):
            entry["r"] = st.st_rdev
        return entry

    def _children(self, rel: bytes, path: bytes, fd: int) -> Optional[List[bytes]]:
        """The names in directory `fd` after excludes, sorted; stat'ed only as they are sent.
        None when it cannot be listed."""
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        except OSError as e:
            self._cannot_list(path, e)
            return None
        if not self._may_exclude_below(rel):
            return names
        prefix = _dir_prefix(rel)
        return [n for n in names if not self.excluded(prefix + path_to_wire(n))]

    def walk(self) -> Iterator[Tuple[Dict[str, Any], bytes]]:
        """Walk order, a directory before its children. A directory's names are all that is
        held of it while its children are sent (a stat per name would be ~0.7 KiB each: GBs
        for a directory of millions); a name that vanishes before its lstat is listed and
        not sent, as when it vanishes after.

        Each directory is opened (O_NOFOLLOW) and checked to be the inode its parent's listing
        saw, then read through its descriptor: on a live server a directory above it may have
        been swapped for a symlink meanwhile, and by path the walk would copy whatever that
        points to, outside the filesystem, under this tree's names.
        """
        root_dev = -1
        # directories still to walk: their paths, and the device and inode their parent's
        # listing saw, in arrays (16 bytes a directory, where a tuple each would be ~170)
        stack, devs, inos = [b""], array("Q", [0]), array("Q", [0])
        while stack:
            rel, dev, ino = stack.pop(), devs.pop(), inos.pop()
            seen = rel != b""  # the root is the only one without a name
            path = self._abs(rel)
            fd = -1
            try:
                fd = _open_dir(path, seen)
                st = os.fstat(fd)
            except OSError as e:
                if not seen:
                    raise
                if e.errno in _WALK_CHANGED:
                    self.changed += 1  # replaced or gone since its parent was listed
                    continue
                try:  # it cannot be opened: sent as it is, unlisted
                    st = os.lstat(path) if len(path) < _PATH_MAX else _long(os.lstat, path)
                    is_dir = stat.S_ISDIR(st.st_mode)
                except OSError:
                    is_dir = False
                if not is_dir:
                    self.changed += 1
                    continue
                denied = e
            try:
                if not seen:
                    root_dev = st.st_dev
                elif (st.st_dev, st.st_ino) != (dev, ino):
                    self.changed += 1  # another directory at this path now
                    continue
                empty = seen and (
                    st.st_dev != root_dev or self.dir_excluded("/" + path_to_wire(rel))
                )
                if empty:
                    listed = []  # type: Optional[List[bytes]]
                elif fd < 0:
                    self._cannot_list(path, denied)
                    listed = None
                else:
                    listed = self._children(rel, path, fd)
                names = listed or []
                entry = self._entry(rel, path, st, "d", fd, None)
                entry["c"] = names
                if empty:
                    entry["e"] = True
                elif listed is None:
                    entry["unlisted"] = True  # the receiver keeps what it has in there
                yield entry, path
                subdirs, sub_devs, sub_inos = [], array("Q"), array("Q")
                for name in names:
                    crel = rel + b"/" + name if rel else name
                    try:
                        cst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        kind = _KINDS.get(stat.S_IFMT(cst.st_mode))
                        if kind == "d":
                            subdirs.append(crel)
                            sub_devs.append(cst.st_dev)
                            sub_inos.append(cst.st_ino)
                        elif kind is not None:
                            cpath = self._abs(crel)
                            yield self._entry(crel, cpath, cst, kind, fd, name), cpath
                    except OSError as e:
                        if e.errno not in _WALK_CHANGED:
                            raise
                        self.changed += 1
                stack.extend(reversed(subdirs))
                sub_devs.reverse()
                sub_inos.reverse()
                devs.extend(sub_devs)
                inos.extend(sub_inos)
            finally:
                if fd >= 0:
                    os.close(fd)

    def _cannot_list(self, path: bytes, error: OSError) -> None:
        if self.log:
            self.log(
                logging.WARNING, f"cannot list {path!r}: {error}; nothing in it is sent or deleted"
            )


def _attrs(path: bytes, st: Any, dir_fd: int, name: Optional[bytes]) -> Dict[str, bytes]:
    if name is not None:
        return _xattrs(path, st) if len(path) < _PATH_MAX else _long(lambda p: _xattrs(p, st), path)
    return _xattrs(dir_fd, st) if dir_fd >= 0 else {}  # a directory that cannot be opened


def _open_dir(path: bytes, nofollow: bool) -> int:
    flags = _DIR_FLAGS | (os.O_NOFOLLOW if nofollow else 0)
    if len(path) < _PATH_MAX:
        return os.open(path, flags)
    return _long(lambda p: os.open(p, flags), path)


def _identity(st: Any) -> Tuple[int, int, int, int, int]:
    """What the walk saw of a file and its entry carries: an inode number alone is reused
    as soon as a file is deleted, and another file (root's, mode 0600) could take it."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)


# what a name the walk listed gives once it vanished or became something else (a symlink, a
# file where a directory was): skipped, as the next pass sends what it is then
_WALK_CHANGED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL)


def _dir_prefix(rel: bytes) -> str:
    """How exclude patterns see the paths below directory `rel`: "/rel/"."""
    return "/" + path_to_wire(rel) + "/" if rel else "/"


# what a path the walk found as a regular file gives once it vanished or became something
# else (a symlink, a directory, a FIFO, a socket, or a file where a directory above it
# was): skipped, as the next pass sends what it is now
_CHANGED = (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ESPIPE, errno.ENOTDIR, errno.ENXIO)


# O_NONBLOCK: a FIFO that replaced the file since the walk would block the open forever
_PEEK_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _open_source(path: bytes) -> int:
    try:
        return os.open(path, _PEEK_FLAGS | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        return os.open(path, _PEEK_FLAGS)


class _Sender:
    """Builds the DATA/DELTA frames of one batch and counts what they carry."""

    def __init__(
        self, client: Any, compressor: _Compressor, stats: Dict[str, int], log: Log
    ) -> None:
        self.client = client
        self.compressor = compressor
        self.stats = stats
        self.log = log
        self.blank: Set[int] = set()
        """Entries of the batch sent with no hash (unreadable): rejected by the receiver."""

    def _pack(self, data: bytes) -> Tuple[int, bytes]:
        self.client.payload_bytes += len(data)
        self.stats["bytes_sent"] += len(data)
        return self.compressor.pack(data)

    def _chunk(self, off: int, data: bytes) -> Frame:
        codec, packed = self._pack(data)
        if len(packed) >= _UNJOINED:
            return chunk_head(off, codec, len(packed)), packed
        return chunk_frame(off, codec, packed)

    def _file(self, fd: int, index: int, size: int, alg: str) -> Optional[Frame]:
        """A file of at most one chunk and no holes as one FILE frame, its zeros not sent
        (the receiver's truncate leaves them a hole); None for any other, or a read error
        (the DATA path then says what it is)."""
        if size > CHUNK_SIZE:
            return None
        try:
            if data_segments(fd, size) != ([(0, size)] if size else []):
                return None
            data = os.pread(fd, size, 0) if size else b""
        except OSError:
            return None
        codec, packed = (CODEC_RAW, b"") if is_zero(data) else self._pack(data)
        head = file_head(index, codec, whole_digest(alg, size, data), len(packed))
        return (head, packed) if len(packed) >= _UNJOINED else head + packed

    def frames(
        self, index: int, path: bytes, size: int, need: List[Any], ident: Tuple[int, ...]
    ) -> Iterator[Frame]:
        """`ident`: the walk's `_identity` of the file."""
        try:
            fd = _open_source(path) if len(path) < _PATH_MAX else _long(_open_source, path)
        except OSError as e:
            self._not_read(path, e)
            return
        if _identity(os.fstat(fd)) != ident:
            # Another file is at the path now: replaced, or reached through a directory
            # swapped for a symlink since the walk. Its content must not go out under the
            # owner and mode the walk saw (a user's file with root's secret in it).
            os.close(fd)
            self._not_read(path, OSError(errno.ENOENT, "another file is at this path now"))
            return
        alg = str(self.client.hash_alg)  # chosen at the connection's hello
        try:
            whole = self._file(fd, index, size, alg) if need[1] != "delta" else None
            if whole is not None:
                yield whole
                self.stats["files_sent"] += 1
                return
            try:
                digest = yield from self._content(fd, index, size, need, alg)
                self.stats["files_sent"] += 1
            except OSError as e:
                # a read error (EIO on the failing disk one migrates away from): an END that
                # nothing matches, so the receiver keeps what it had of the file
                self._not_read(path, e)
                digest = ""
                self.blank.add(index)
            # compact JSON, without json's cost on every small file
            end = f'{{"i":{index},"hash":"{digest}","alg":"{alg}"}}'
            yield encode_frame(END, end.encode("ascii"))
        finally:
            os.close(fd)

    def _not_read(self, path: bytes, error: OSError) -> None:
        if error.errno in _CHANGED:  # churn on a live server: the next pass sends it
            self.stats["changed"] += 1
            level, message = logging.INFO, f"skipping {path!r}: it changed since the walk ({error})"
        else:
            self.stats["unreadable"] += 1
            level, message = logging.WARNING, f"cannot read {path!r}: {error}; it is not sent"
        if self.log:
            self.log(level, message)

    def _content(
        self, fd: int, index: int, size: int, need: List[Any], alg: str
    ) -> Generator[Frame, None, str]:
        """A file's DATA or DELTA frames, its END's hash returned."""
        if need[1] == "delta":
            block, theirs = int(need[2]), list(need[3])
            yield encode_frame(DELTA, b'{"i":%d}' % index)
            self.stats["delta_files"] += 1
            mine = []  # type: List[str]
            for off, digest in block_digests(fd, size, block, alg):
                k = off // block
                mine.append(digest)
                if k < len(theirs) and theirs[k] == digest:
                    continue
                stop = min(off + block, size)
                # read again, in pieces (a block can be far larger than a frame), its
                # holes sent as zero runs, which the receiver punches: it stays sparse
                pos = off
                for at, data in iter_data(fd, stop, CHUNK_SIZE, off):
                    if at > pos:
                        yield zero_frame(pos, at - pos)
                    yield zero_frame(at, len(data)) if is_zero(data) else self._chunk(at, data)
                    pos = at + len(data)
                if pos < stop:
                    yield zero_frame(pos, stop - pos)
            return blocks_digest(alg, mine)
        yield encode_frame(DATA, b'{"i":%d}' % index)
        whole = FileDigest(alg, size)
        for off, data in iter_data(fd, size, CHUNK_SIZE):
            whole.feed(off, data)
            if not is_zero(data):
                yield self._chunk(off, data)
        return whole.hexdigest()


def sync_filesystem(
    client: Any,
    fs_id: str,
    root: str,
    excludes: List[str],
    compression: str = "auto",
    log: Log = None,
    pass_no: int = 1,
) -> Dict[str, int]:
    """Make the receiver's copy of filesystem `fs_id` equal to the tree at `root`.

    `excludes` are glob patterns relative to `root` ("/proc/*": the contents of /proc; the
    directory itself is sent empty). Returns counters: entries, files_sent, bytes_sent (file
    payload before compression), delta_files, deleted, batches, bytes_on_wire, unreadable
    (files not sent for a read error: the receiver keeps what it had of them), changed
    (entries that changed while the pass ran: skipped because the walk or the send found
    another file, or none, where it listed one, or rejected by the receiver's hash check;
    the next pass sends them as they are then).
    """
    stats = {
        "entries": 0,
        "files_sent": 0,
        "bytes_sent": 0,
        "delta_files": 0,
        "deleted": 0,
        "batches": 0,
        "bytes_on_wire": 0,
        "unreadable": 0,
        "changed": 0,
    }
    wire_start = client.bytes_on_wire
    sender = _Sender(client, _Compressor(compression, client), stats, log)
    quoted = quote(fs_id, safe="")
    walker = _Walker(root, excludes, log)
    started = time.monotonic()
    for batch, frames in _prefetched(_batches(walker)):
        _send_batch(client, quoted, batch, frames, sender, stats, log)
    stats["changed"] += walker.changed
    done = client.post_json("/v1/finish/" + quoted, {"pass": pass_no})
    stats["deleted"] += int(done.get("deleted", 0))
    stats["bytes_on_wire"] = client.bytes_on_wire - wire_start
    if log:
        log(
            logging.INFO,
            "{}: {entries} entries, {files_sent} files ({delta_files} by delta), {bytes_sent} "
            "payload bytes, {bytes_on_wire} on the wire, {deleted} deleted in {:.1f}s".format(
                fs_id, time.monotonic() - started, **stats
            ),
        )
    return stats


_Batch = Tuple[List[Tuple[Dict[str, Any], bytes]], List[bytes]]


def _batches(walker: _Walker) -> Iterator[_Batch]:
    """The walk cut into manifests: (entries with their paths, ENTRY frames)."""
    batch = []  # type: List[Tuple[Dict[str, Any], bytes]]
    frames = []  # type: List[bytes]
    size = xattrs = 0
    for whole, path in walker.walk():
        for entry in child_slices(whole):  # a huge directory lists its names over several
            entry["i"] = len(batch)
            frame = encode_entry(entry)
            if len(frame) > MAX_FRAME:
                raise AgentError(
                    "ENTRY_TOO_LARGE",
                    f"{os.fsdecode(path)}: its entry takes {len(frame)} bytes with its "
                    f"extended attributes, and the receiver takes at most {MAX_FRAME}",
                    hint="remove what it does not need of its extended attributes, or "
                    "exclude it (Excludes) and copy it separately",
                )
            if entry["t"] == "f" and entry["s"] > MAX_FILE_SIZE:
                raise AgentError(
                    "FILE_TOO_LARGE",
                    f"{os.fsdecode(path)}: its size is {entry['s']} bytes, and the receiver "
                    f"takes files of at most {MAX_FILE_SIZE} (1 PiB)",
                    hint="exclude it (Excludes) and copy it separately",
                )
            batch.append((entry, path))
            frames.append(frame)
            size += len(frame)
            xattrs += len(entry.get("x") or ())
            if len(batch) >= BATCH_ENTRIES or size >= BATCH_BYTES or xattrs >= BATCH_XATTRS:
                yield batch, frames
                batch, frames, size, xattrs = [], [], 0, 0
    if batch:
        yield batch, frames


def _prefetched(batches: Iterator[_Batch]) -> Iterator[_Batch]:
    """`batches`, produced by a thread up to _PREFETCH ahead: the walk (stat, xattrs, encoding)
    then overlaps the receiver's work on the previous batch instead of waiting for it."""
    out = queue.Queue(_PREFETCH)  # type: queue.Queue[Any]
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            out.put(e)

    thread = threading.Thread(target=produce, name="walk", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _send_batch(
    client: Any,
    quoted: str,
    batch: List[Tuple[Dict[str, Any], bytes]],
    frames: List[bytes],
    sender: _Sender,
    stats: Dict[str, int],
    log: Log,
) -> None:
    for attempt in range(_BATCH_ATTEMPTS):
        try:
            answer = client.post_frames("/v1/manifest/" + quoted, frames)
            needs = answer.get("needs") or []
            rejected = []  # type: List[Any]
            sender.blank.clear()
            if needs:
                rejected = (
                    client.post_frames(
                        "/v1/data/{}?batch={}".format(quoted, answer.get("batch", "")),
                        _data_frames(batch, needs, sender),
                    ).get("failed")
                    or []
                )
            break
        except AgentError as e:
            if (
                e.code not in ("RECEIVER_UNREACHABLE", "STALE_BATCH")
                or attempt == _BATCH_ATTEMPTS - 1
            ):
                raise
            if log:
                log(logging.WARNING, f"batch interrupted ({e}); retrying it")
    for index in rejected:
        if isinstance(index, int) and 0 <= index < len(batch) and index not in sender.blank:
            # its hash did not match what arrived: it changed while it was read
            stats["changed"] += 1
            if log:
                log(
                    logging.INFO, f"{batch[index][1]!r} changed while it was sent; resent next pass"
                )
    stats["entries"] += len(batch)
    stats["batches"] += 1
    stats["deleted"] += int(answer.get("deleted", 0))


def _data_frames(
    batch: List[Tuple[Dict[str, Any], bytes]], needs: List[List[Any]], sender: _Sender
) -> Iterator[Frame]:
    sender.compressor.new_stream()
    try:
        for need in needs:
            index = int(need[0])
            if not 0 <= index < len(batch):
                raise AgentError("PROTOCOL_ERROR", f"the receiver asked for entry {index}")
            entry, path = batch[index]
            if entry["t"] != "f":
                raise AgentError("PROTOCOL_ERROR", f"the receiver asked for {path!r}'s content")
            yield from sender.frames(index, path, int(entry["s"]), need, entry["id"])
    finally:
        sender.compressor.end_stream()
