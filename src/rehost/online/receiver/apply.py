"""Applying the agent's entries and file data to one destination filesystem, safely.

Every path is resolved component by component from the filesystem's root with
O_NOFOLLOW | O_DIRECTORY and dir_fd, so no "..", absolute path or symlink (received earlier
or already there) can make a write land outside the root; such an entry is refused with
ProtocolError. Files are received under a `.rehost-partial-*` name and renamed into place
after their hash is verified; an interrupted large file stays as that partial and is
resumed by delta. A small file (< DELTA_MIN_SIZE) that the destination lacks is instead
created under its own name (O_CREAT | O_EXCL | O_NOFOLLOW), with fd-only metadata calls:
its times are set last, so an interrupted one keeps a fresh mtime and the quick check sends
it again. Every file's content hash is computed while it is written and compared with the
agent's (a delta's, over its block hashes: those of the kept blocks are known from the
manifest's answer). Metadata goes on in the order content → lchown → chmod → xattrs
(security.capability last, since chown clears it) → times.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from rehost.online.protocol import (
    CHUNK,
    CHUNK_SIZE,
    CODEC_RAW,
    CODEC_ZERO,
    CODEC_ZLIB,
    CODEC_ZSTD,
    DATA,
    DELTA,
    DELTA_MIN_SIZE,
    END,
    ENTRY,
    FILE,
    HASH_HEX,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_ENTRIES,
    MAX_MANIFEST_XATTRS,
    PARTIAL_PREFIX,
    ZSTD_WINDOW_MAX,
    ChildNames,
    FileDigest,
    ProtocolError,
    block_digests,
    block_hash,
    blocks_digest,
    decode_chunk,
    decode_entry,
    decode_file,
    decode_json,
    delta_block_size,
    feed_zeros,
    file_digest,
    new_hash,
    partial_name,
    required_int,
    split_relpath,
    whole_digest,
    zero_block_hash,
    zero_length,
)
from rehost.online.receiver.journal import Journal

log = logging.getLogger("rehost.receiver")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CAPABILITY = "security.capability"
_FMT = {
    "f": stat.S_IFREG,
    "d": stat.S_IFDIR,
    "l": stat.S_IFLNK,
    "c": stat.S_IFCHR,
    "b": stat.S_IFBLK,
    "p": stat.S_IFIFO,
    "s": stat.S_IFSOCK,
}
_TMP_PREFIX = b".rehost-tmp-"
_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_DIR_CACHE = 128  # open directory fds kept per filesystem
# bumped whenever _rmtree removes a directory: a cached directory fd may then be stale
_removed_dirs = 0


def _punch(fd: int, offset: int, length: int) -> None:
    """Make a range read as zeros: punch a hole, or write zeros where holes are unsupported."""
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return
    for off in range(offset, offset + length, CHUNK_SIZE):
        _pwrite_all(fd, bytes(min(CHUNK_SIZE, offset + length - off)), off)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite may write less than asked (a filling disk, a signal): write the rest, or
    raise, so that a short write can never pass for a received file."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, "no progress writing a received file")
        view, offset = view[n:], offset + n


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _rmtree(dir_fd: int, name: bytes) -> None:
    """Remove `name` in `dir_fd` and everything below it, never following a symlink."""
    global _removed_dirs
    st = _lstat(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _rmtree(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
    _removed_dirs += 1


def _tmp_name(name: bytes) -> bytes:
    return _TMP_PREFIX + hashlib.sha256(name).hexdigest()[:32].encode()


def _proc(dir_fd: int, name: bytes) -> bytes:
    """A path to `name` in `dir_fd` that works with follow_symlinks=False and no dir_fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


_ZSTD_WRITE = CHUNK_SIZE + 128 * 1024
"""The zstd decoder's output per step. zstandard's writer stops once a chunk's input is
consumed, and what did not fit in that step's output would come out with the next chunk:
a chunk (at most CHUNK_SIZE) always fits in one step."""


class _Sink:
    """Where a zstd stream's decoder writes one chunk's output, a step at a time."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += len(data)
        if self.size > CHUNK_SIZE:
            raise ProtocolError("BAD_FRAME", "a zstd chunk decodes to more than a chunk")
        self.out.append(bytes(data))
        return len(data)


class _Decoder:
    """A data stream's chunks, decoded: zlib chunks stand alone; zstd chunks continue the
    stream's one zstd stream (CODEC_ZSTD). A chunk that decodes to more than CHUNK_SIZE, or
    is garbled, is BAD_FRAME, and no more than that is ever held.

    The zstd writer writes to a `_Sink`, not to this object: zstandard's writer is not
    tracked by Python's cycle collector, so a cycle through it would keep its decoder
    (about 1 MB of native memory) for the life of the receiver, one per data request.
    """

    def __init__(self) -> None:
        self._zstd: Any = None  # the stream's decoder, from its first zstd chunk
        self._sink = _Sink()

    def decode(self, codec: int, data: memoryview) -> bytes | memoryview:
        if codec == CODEC_RAW:
            return data
        if codec == CODEC_ZLIB:
            d = zlib.decompressobj()
            try:
                out = d.decompress(data, CHUNK_SIZE)
            except zlib.error as e:
                raise ProtocolError("BAD_FRAME", f"bad zlib chunk: {e}") from None
            if d.unconsumed_tail:
                raise ProtocolError("BAD_FRAME", "a zlib chunk decodes to more than a chunk")
            return out
        if codec == CODEC_ZSTD:
            sink = self._sink
            if self._zstd is None:
                self._zstd = zstandard.ZstdDecompressor(
                    max_window_size=ZSTD_WINDOW_MAX
                ).stream_writer(cast("IO[bytes]", sink), write_size=_ZSTD_WRITE, closefd=False)
            sink.out, sink.size = [], 0
            try:
                self._zstd.write(data)
            except zstandard.ZstdError as e:
                raise ProtocolError("BAD_FRAME", f"bad zstd chunk: {e}") from None
            return b"".join(sink.out)
        raise ProtocolError("BAD_FRAME", f"unknown codec {codec}")


def _land(
    cur: _Incoming, decoder: _Decoder, offset: int, codec: int, body: memoryview
) -> bytes | memoryview:
    """A chunk's data, decoded and written at `offset` of the file being received."""
    data = decoder.decode(codec, body)
    if offset + len(data) > cur.size:
        raise ProtocolError("BAD_FRAME", "a chunk past the file's size")
    _pwrite_all(cur.fd, data, offset)
    return data


def _meta_matches(entry: dict[str, Any], kind: str, st: os.stat_result) -> bool:
    """Owner, mode (not for symlinks) and times (not for directories) are as the entry says."""
    return (
        st.st_uid == entry["u"]
        and st.st_gid == entry["g"]
        and (kind == "l" or stat.S_IMODE(st.st_mode) == entry["m"] & 0o7777)
        and (kind == "d" or (st.st_mtime_ns == entry["mt"] and st.st_atime_ns == entry["at"]))
    )


class _Incoming:
    """One file being received in a DATA POST."""

    def __init__(
        self, fd: int, pfd: int, name: bytes, tmp: bytes | None, entry: dict[str, Any], size: int
    ):
        self.fd = fd
        self.pfd = pfd
        self.name = name
        self.tmp = tmp  # the partial's name, renamed into place at END; None when in place
        self.entry = entry
        self.size = size
        self.delta = False
        self.new = False  # created under its own name by this request (O_EXCL)
        # a delta's block size and block hashes: those kept from the manifest's answer, each
        # replaced as its block arrives; None once something arrives off the block grid
        self.block = 0
        self.hashes: list[str | None] | None = None
        self.open: tuple[int, Any, int] | None = None  # a block coming in pieces: k, hash, end

    def note_piece(
        self, alg: str, offset: int, length: int, data: bytes | memoryview | None
    ) -> None:
        """A delta piece arrived (data None: zeros): fold it into its block's hash.

        A block larger than a frame comes in pieces, in order; its hash is unknown (None)
        until the last one. Anything else off the block grid leaves END to re-read the file.
        """
        if self.hashes is None:
            return
        k, within = divmod(offset, self.block)
        last = min(self.block, self.size - k * self.block)  # the block's length
        if k >= len(self.hashes) or within + length > last:
            self.hashes = None
        elif within == 0 and length == last:  # a whole block
            self.hashes[k] = zero_block_hash(alg, length) if data is None else block_hash(alg, data)
        elif within == 0 or (self.open is not None and self.open[::2] == (k, within)):
            hasher = new_hash(alg) if within == 0 else cast("tuple[int, Any, int]", self.open)[1]
            if data is None:
                feed_zeros(hasher, length)
            else:
                hasher.update(data)
            self.hashes[k] = None
            self.open = (k, hasher, within + length)
            if within + length == last:
                self.hashes[k] = str(hasher.hexdigest())[:HASH_HEX]
                self.open = None
        else:
            self.hashes = None


class _Listing:
    """What a directory holds that its entry has not listed: deleted once the last slice of
    its child names has come (a directory of millions of names comes in several entries).

    Sets of what is here, not of what was sent: a sent list may be a frame of millions of
    names (ChildNames). `gone` is None when the first slice was missed, and then nothing
    is deleted: what is here may have been listed in it.
    """

    def __init__(self, path: str, here: set[bytes] | None) -> None:
        self.path = path
        self.gone = here
        self.partials = {n for n in here or () if n.startswith(PARTIAL_PREFIX.encode())}

    def sent(self, names: ChildNames | None) -> None:
        """Keep what `names` lists, and the partial files of listed files (their resume)."""
        if self.gone is None or names is None:
            return
        for slab in names.slabs():
            self.gone.difference_update(slab)
            if self.partials:
                self.gone.difference_update(self.partials.intersection(map(partial_name, slab)))


class FsApplier:
    """Applies manifests, data batches and pass ends to the filesystem at `root`."""

    def __init__(self, fs_id: str, root: Path, state_dir: Path) -> None:
        self.fs_id = fs_id
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.journal = Journal(state_dir, fs_id)
        self.batch = 0
        # index → (entry, path, "full"|"delta", where, [block size, block hashes] of a
        # delta): where the data goes, "partial" (the .rehost-partial-* file, renamed into
        # place at END), "inplace" (a delta patching the file itself) or "new" (a small file
        # the destination lacks, created under its name)
        self.pending: dict[int, tuple[dict[str, Any], list[bytes], str, str, list[Any]]] = {}
        self.deferred: list[tuple[dict[str, Any], list[bytes]]] = []
        # directories this manifest made: nothing else is in them, so their files, links
        # and nodes need no lstat (28,000 failing ones were 3% of a full copy's receiver)
        self.fresh: set[tuple[bytes, ...]] = set()
        self.xattr_warned = False
        self.alg = "sha256"
        # directories resolved recently, by path: entries arrive in walk order, so most
        # lookups are a hit and cost one dup() instead of an open() per path component;
        # emptied at the start of every request, and whenever _rmtree removed a directory
        self.dirs: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self.dirs_gen = _removed_dirs
        self.listing: _Listing | None = None
        """A directory whose child names are coming in slices, until its last one."""
        # partial files this pass's listings kept (their file was listed), and those a file
        # was then received into: at the pass's end the rest are stale (their name became a
        # directory or a link, or the file matched without them) and go
        self.partials_kept: set[tuple[tuple[bytes, ...], bytes]] = set()
        self.partials_used: set[tuple[tuple[bytes, ...], bytes]] = set()

    def close(self) -> None:
        self._drop_dirs()
        os.close(self.root_fd)

    def _drop_dirs(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        self.dirs_gen = _removed_dirs

    # --- path resolution ----------------------------------------------------------------

    def _borrow_dir(self, parts: list[bytes]) -> int | None:
        """The cached fd of the directory at `parts`, if there is one, not duplicated: the
        caller must not close it, nor keep it past its next _open_dir call (which may close
        it). Saves a dup and a close for most entries of a walk."""
        if not parts:
            return self.root_fd
        if self.dirs_gen != _removed_dirs:
            return None
        return self.dirs.get(tuple(parts))

    def _open_dir(self, parts: list[bytes]) -> int:
        """A new fd of the directory at `parts` (the caller closes it), resolved safely."""
        if self.dirs_gen != _removed_dirs:
            self._drop_dirs()
        key = tuple(parts)
        start = len(key)
        while start and key[:start] not in self.dirs:
            start -= 1
        if start == len(key) and start:
            self.dirs.move_to_end(key)
            return os.dup(self.dirs[key])
        fd = os.dup(self.dirs[key[:start]] if start else self.root_fd)
        try:
            for part in parts[start:]:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ProtocolError(
                            "UNSAFE_PATH",
                            f"{b'/'.join(parts)!r} passes through a symlink or non-directory",
                        ) from None
                    if e.errno == errno.ENOENT:
                        raise ProtocolError(
                            "MISSING_PARENT", f"{b'/'.join(parts)!r} does not exist"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        if key:
            self.dirs[key] = os.dup(fd)
            if len(self.dirs) > _DIR_CACHE:
                os.close(self.dirs.popitem(last=False)[1])
        return fd

    # --- metadata -----------------------------------------------------------------------

    def _set_meta(
        self,
        entry: dict[str, Any],
        kind: str,
        fd: int | None,
        pfd: int,
        name: bytes,
        st: os.stat_result | None = None,
    ) -> None:
        """lchown → chmod → xattrs (capability last) → times, on an fd or a no-follow path.

        With `st` (the entry's current lstat) owner, mode and times that already match are
        left alone: an unchanged entry then costs only the xattr listing.
        """
        where: int | bytes = fd if fd is not None else _proc(pfd, name)
        nofollow: dict[str, Any] = {} if fd is not None else {"follow_symlinks": False}
        if st is not None and _meta_matches(entry, kind, st):
            self._set_xattrs(entry, where, nofollow)
            return
        os.chown(where, entry["u"], entry["g"], **nofollow)
        if kind != "l":
            os.chmod(where, entry["m"] & 0o7777)
        self._set_xattrs(entry, where, nofollow)
        atime, mtime = entry["at"], entry["mt"]
        if kind != "d":
            os.utime(where, ns=(atime, mtime), **nofollow)

    def _set_xattrs(self, entry: dict[str, Any], where: int | bytes, kw: dict[str, Any]) -> None:
        want: dict[str, bytes] = entry["x"]
        try:
            listed = os.listxattr(where, **kw)
            if not listed and not want:
                return  # the usual case: none wanted, none there
            have = set(listed)
            for name in have - set(want):
                try:
                    os.removexattr(where, name, **kw)
                except OSError as e:
                    # xfs lists each ACL twice (system.posix_acl_* and trusted.SGI_ACL_*):
                    # removing one name removes the other
                    if e.errno != errno.ENODATA:
                        raise
            for name in sorted(want, key=lambda n: n == _CAPABILITY):
                if name in have and os.getxattr(where, name, **kw) == want[name]:
                    continue
                os.setxattr(where, name, want[name], **kw)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                raise
            if not self.xattr_warned:
                log.warning("%s: cannot set xattrs (%s); continuing without", self.fs_id, e)
                self.xattr_warned = True

    # --- manifests ----------------------------------------------------------------------

    def manifest(self, frames: Iterable[tuple[bytes, bytes]], alg: str) -> dict[str, Any]:
        """Apply a manifest's entries; answer which files need data (full or delta)."""
        self.batch += 1
        self._drop_dirs()  # the destination may have changed between requests
        self.pending = {}
        self.deferred = []
        self.fresh = set()
        needs: list[list[Any]] = []
        dirs: list[tuple[str, int, int]] = []
        deleted = 0
        applied = 0
        size = 0
        xattrs = 0
        pending_paths: set[bytes] = set()
        new_hash(alg)  # refuse an unknown algorithm before touching anything
        for kind, payload in frames:
            if kind != ENTRY:
                raise ProtocolError("BAD_FRAME", "a manifest holds ENTRY frames only")
            size += len(payload)
            if applied == MAX_MANIFEST_ENTRIES:
                raise ProtocolError(
                    "BAD_FRAME", f"a manifest holds at most {MAX_MANIFEST_ENTRIES} entries"
                )
            if size > MAX_MANIFEST_BYTES:
                raise ProtocolError(
                    "BAD_FRAME", f"a manifest's entries take at most {MAX_MANIFEST_BYTES} bytes"
                )
            entry = decode_entry(payload)
            xattrs += len(entry["x"])
            if xattrs > MAX_MANIFEST_XATTRS:
                raise ProtocolError(
                    "BAD_FRAME", f"a manifest's entries hold at most {MAX_MANIFEST_XATTRS} xattrs"
                )
            index = entry["i"]
            parts = entry["parts"]
            t = entry["t"]
            if not parts and t != "d":
                raise ProtocolError("BAD_ENTRY", "the root must be a directory")
            if t == "d":
                deleted += self._apply_dir(entry, parts)
                if not entry["more"]:
                    dirs.append((entry["p"], entry["at"], entry["mt"]))
            elif t == "h":
                target = entry["h"]
                if b"/".join(target) in pending_paths:
                    self.deferred.append((entry, parts))
                else:
                    self._apply_link(parts, target)
            else:
                wanted = self._apply_other(entry, t, parts, alg)
                if wanted is not None:
                    need, where = wanted
                    if where == "partial":
                        self.partials_used.add((tuple(parts[:-1]), partial_name(parts[-1])))
                    needs.append([index, *need])
                    self.pending[index] = (entry, parts, need[0], where, need[1:3])
                    pending_paths.add(b"/".join(parts))
            applied += 1
        self.journal.add_dirs(dirs)
        self.alg = alg
        return {"needs": needs, "applied": applied, "deleted": deleted, "batch": self.batch}

    def _apply_dir(self, entry: dict[str, Any], parts: list[bytes]) -> int:
        st: os.stat_result | None = None
        if parts:
            pfd = self._open_dir(parts[:-1])
            try:
                name = parts[-1]
                st = _lstat(pfd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    _rmtree(pfd, name)
                    st = None
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                    self.fresh.add(tuple(parts))
            finally:
                os.close(pfd)
        fd = self._open_dir(parts)
        try:
            listing = self._listing_for(entry, fd)
            listing.sent(None if entry["e"] else entry["c"])
            self.listing = listing if entry["more"] else None
            if entry["more"]:
                return 0
            gone = listing.gone or set()
            for name in gone:
                _rmtree(fd, name)
            if listing.gone is not None:
                self.partials_kept.update((tuple(parts), p) for p in listing.partials - gone)
            self._set_meta(entry, "d", fd, fd, b"", st)
        finally:
            os.close(fd)
        return len(gone)

    def _listing_for(self, entry: dict[str, Any], fd: int) -> _Listing:
        """The open listing a continued slice belongs to, or a new one of the directory `fd`."""
        listing = self.listing
        if entry["unlisted"]:  # an I/O error on a failing source disk, say
            log.warning(
                "%s: the agent could not list %r; nothing in it is deleted this pass",
                self.fs_id,
                entry["p"],
            )
            return _Listing(entry["p"], None)
        if entry["cont"] and listing is not None and listing.path == entry["p"]:
            return listing
        if entry["cont"]:  # its first slice went to a receiver that since restarted
            log.warning(
                "%s: %r continues a listing this receiver did not see begin; what it lacks "
                "is deleted next pass",
                self.fs_id,
                entry["p"],
            )
            return _Listing(entry["p"], None)
        return _Listing(entry["p"], set(map(os.fsencode, os.listdir(fd))))

    def _apply_link(self, parts: list[bytes], target: list[bytes]) -> None:
        if not parts or not target:
            raise ProtocolError("BAD_ENTRY", "a hardlink needs a path and a target")
        tfd = self._open_dir(target[:-1])
        try:
            tst = _lstat(tfd, target[-1])
            if tst is None or stat.S_ISDIR(tst.st_mode):
                log.warning("%s: hardlink target %r missing; skipped", self.fs_id, target)
                return
            pfd = self._open_dir(parts[:-1])
            try:
                name = parts[-1]
                st = _lstat(pfd, name)
                if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                    return
                tmp = _tmp_name(name)
                _rmtree(pfd, tmp)
                os.link(target[-1], tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    _rmtree(pfd, name)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _apply_other(
        self, entry: dict[str, Any], t: str, parts: list[bytes], alg: str
    ) -> tuple[list[Any], str] | None:
        borrowed = self._borrow_dir(parts[:-1])  # nothing below opens another directory
        pfd = borrowed if borrowed is not None else self._open_dir(parts[:-1])
        try:
            name = parts[-1]
            st = None if tuple(parts[:-1]) in self.fresh else _lstat(pfd, name)
            if st is not None and stat.S_IFMT(st.st_mode) != _FMT[t]:
                _rmtree(pfd, name)
                st = None
            if t == "f":
                return self._file_need(entry, pfd, name, st, alg)
            if t == "l":
                target = entry["l"]
                if st is not None and os.readlink(name, dir_fd=pfd) == target:
                    self._set_meta(entry, t, None, pfd, name, st)
                    return None
                tmp = _tmp_name(name)
                _rmtree(pfd, tmp)
                os.symlink(target, tmp, dir_fd=pfd)
            else:
                rdev = entry["r"]
                if st is not None and (t not in "cb" or st.st_rdev == rdev):
                    self._set_meta(entry, t, None, pfd, name, st)
                    return None
                tmp = _tmp_name(name)
                _rmtree(pfd, tmp)
                os.mknod(tmp, _FMT[t] | 0o600, rdev, dir_fd=pfd)
            self._set_meta(entry, t, None, pfd, tmp)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            return None
        finally:
            if borrowed is None:
                os.close(pfd)

    def _file_need(
        self, entry: dict[str, Any], pfd: int, name: bytes, st: os.stat_result | None, alg: str
    ) -> tuple[list[Any], str] | None:
        """What the file needs (the wire's need, without the index) and where it lands."""
        size = entry["s"]
        split_link = st is not None and st.st_nlink > 1 and entry["n"] <= 1
        if (
            st is not None
            and not split_link
            and st.st_size == size
            and st.st_mtime_ns == entry["mt"]
        ):
            if _meta_matches(entry, "f", st):
                self._set_xattrs(entry, _proc(pfd, name), {"follow_symlinks": False})
                return None
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                self._set_meta(entry, "f", fd, pfd, name)
            finally:
                os.close(fd)
            return None
        if size < DELTA_MIN_SIZE:
            # a small file the destination lacks is written under its own name: nothing to
            # replace atomically, and an interrupted one keeps a fresh mtime (times are set
            # last), so the quick check sends it again
            return ["full"], "new" if st is None else "partial"
        partial = partial_name(name)
        pst = _lstat(pfd, partial)
        if pst is not None and stat.S_ISREG(pst.st_mode):
            return ["delta", *self._hashes(pfd, partial, size, alg), "partial"], "partial"
        if st is not None and not split_link and st.st_size >= DELTA_MIN_SIZE:
            return ["delta", *self._hashes(pfd, name, size, alg), "inplace"], "inplace"
        return ["full"], "partial"

    def _hashes(self, pfd: int, name: bytes, size: int, alg: str) -> list[Any]:
        block = delta_block_size(size)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            return [block, _block_hashes(fd, min(os.fstat(fd).st_size, size), block, alg)]
        finally:
            os.close(fd)

    def _delta_digest(self, cur: _Incoming, alg: str) -> str:
        """END's hash for a delta: from the tracked block hashes when every block is known
        (kept or received), else from the patched file, re-read."""
        hashes = cur.hashes
        if hashes is None or None in hashes or alg != self.alg:
            return blocks_digest(alg, _block_hashes(cur.fd, cur.size, cur.block, alg))
        return blocks_digest(alg, cast("list[str]", hashes))

    # --- data ---------------------------------------------------------------------------

    def data(self, batch: int, frames: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
        """Receive a batch's files, make them durable, then journal them."""
        if batch != self.batch or not self.pending:
            raise ProtocolError("STALE_BATCH", f"batch {batch} is not the last manifest")
        self._drop_dirs()
        files = 0
        received = 0
        failed: list[int] = []
        cur: _Incoming | None = None
        digest: FileDigest | None = None  # a DATA file's, while its blocks come in order
        decoder = _Decoder()
        try:
            for kind, payload in frames:
                if cur is not None and kind in (DATA, DELTA, FILE):
                    raise ProtocolError("BAD_FRAME", "a file began before the last ended")
                if kind in (DATA, DELTA):
                    cur = self._open_incoming(_header_index(payload), kind == DELTA)
                    digest = FileDigest(self.alg, cur.size) if kind == DATA else None
                elif kind == CHUNK:
                    if cur is None:
                        raise ProtocolError("BAD_FRAME", "a chunk outside a file")
                    offset, codec, body = decode_chunk(payload)
                    if codec == CODEC_ZERO:
                        length = zero_length(body)
                        if offset + length > cur.size:
                            raise ProtocolError("BAD_FRAME", "a chunk past the file's size")
                        if cur.delta:
                            _punch(cur.fd, offset, length)
                            cur.note_piece(self.alg, offset, length, None)
                        continue
                    data = _land(cur, decoder, offset, codec, body)
                    received += len(data)
                    if cur.delta:
                        cur.note_piece(self.alg, offset, len(data), data)
                    elif digest is not None and not digest.feed(offset, data):
                        digest = None  # out of order: verify by re-reading instead
                elif kind == END:
                    if cur is None:
                        raise ProtocolError("BAD_FRAME", "END outside a file")
                    end = decode_json(payload)
                    alg = str(end.get("alg", "sha256"))
                    if cur.delta:
                        got = self._delta_digest(cur, alg)
                    elif digest is not None and alg == self.alg:
                        got = digest.hexdigest()
                    else:
                        got = file_digest(cur.fd, cur.size, alg)
                    if self._settle(cur, got == end.get("hash")):
                        files += 1
                    else:
                        failed.append(required_int(end, "i"))
                    cur = None
                elif kind == FILE:
                    index, codec, want, body = decode_file(payload)
                    cur = self._open_incoming(index, False)
                    data = _land(cur, decoder, 0, codec, body)
                    received += len(data)
                    if self._settle(cur, whole_digest(self.alg, cur.size, data) == want):
                        files += 1
                    else:
                        failed.append(index)
                    cur = None
        finally:
            if cur is not None:  # the stream broke off inside a file
                os.close(cur.fd)
                os.close(cur.pfd)
        for entry, parts in self.deferred:
            self._apply_link(parts, entry["h"])
        self.pending = {}
        self.deferred = []
        self.journal.commit(self.root_fd, batches=1, files=files, bytes=received)
        return {"files": files, "bytes": received, "failed": failed}

    def _open_incoming(self, index: int, delta: bool) -> _Incoming:
        if index not in self.pending:
            raise ProtocolError("BAD_FRAME", f"entry {index} was not asked for")
        entry, parts, kind, where, blocks = self.pending.pop(index)
        if delta != (kind == "delta"):
            raise ProtocolError("BAD_FRAME", f"entry {index} came as the wrong kind")
        pfd = self._open_dir(parts[:-1])
        name = parts[-1]
        size = entry["s"]
        fd = -1
        try:
            # O_NONBLOCK: a FIFO or device planted at the name must not hang the open
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if where == "new":
                # created with its final permission bits (umask allowing), so that chmod is
                # usually unnecessary; truncated to size at END only if holes remain
                try:
                    fd = os.open(
                        name,
                        flags | os.O_CREAT | os.O_EXCL,
                        entry["m"] & 0o777,
                        dir_fd=pfd,
                    )
                except FileExistsError:  # it appeared since the manifest: replace it safely
                    where = "partial"
                else:
                    incoming = _Incoming(fd, pfd, name, None, entry, size)
                    incoming.new = True
                    return incoming
            partial = partial_name(name)
            tmp: bytes | None = partial
            if not delta:  # made anew, never opened: whatever holds the name is not a file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial, dir_fd=pfd)
                fd = os.open(partial, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=pfd)
            elif where == "partial":
                fd = os.open(partial, flags, dir_fd=pfd)
            else:
                tmp = None
                fd = os.open(name, flags, dir_fd=pfd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ProtocolError(
                    "UNSAFE_PATH", f"{entry['p']}: a delta's base is not a regular file"
                )
            incoming = _Incoming(fd, pfd, name, tmp, entry, size)
            incoming.delta = delta
            if delta:
                incoming.block, kept = blocks
                count = -(-size // incoming.block)
                incoming.hashes = [*kept[:count], *[None] * (count - len(kept))]
            os.ftruncate(fd, size)
            return incoming
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.close(pfd)
            raise

    def _commit_file(self, cur: _Incoming) -> None:
        try:
            if cur.new:
                self._finish_new(cur)
                return
            self._set_meta(cur.entry, "f", cur.fd, cur.pfd, cur.name)
            if cur.tmp is not None:
                st = _lstat(cur.pfd, cur.name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    _rmtree(cur.pfd, cur.name)
                os.rename(cur.tmp, cur.name, src_dir_fd=cur.pfd, dst_dir_fd=cur.pfd)
        finally:
            os.close(cur.fd)
            os.close(cur.pfd)

    def _finish_new(self, cur: _Incoming) -> None:
        """Size, owner, mode, xattrs, then times on a file this request created: fd calls
        only, and owner and mode only where the creation did not already get them right."""
        entry = cur.entry
        st = os.fstat(cur.fd)
        if st.st_size != cur.size:
            os.ftruncate(cur.fd, cur.size)  # a hole at the end
        uid, gid = entry["u"], entry["g"]
        mode = entry["m"] & 0o7777
        chowned = (st.st_uid, st.st_gid) != (uid, gid)
        if chowned:
            os.chown(cur.fd, uid, gid)
        # chown clears setuid/setgid: set the mode after it whenever those bits are wanted
        if stat.S_IMODE(st.st_mode) != mode or (chowned and mode & 0o6000):
            os.chmod(cur.fd, mode)
        self._set_xattrs(entry, cur.fd, {})
        os.utime(cur.fd, ns=(entry["at"], entry["mt"]))

    def _settle(self, cur: _Incoming, matched: bool) -> bool:
        """Commit a received file whose hash matched; else leave it to be resent."""
        if matched:
            self._commit_file(cur)
        else:
            self._reject_file(cur)
        return matched

    def _reject_file(self, cur: _Incoming) -> None:
        """A hash mismatch (the source changed while read): make the next pass resend it."""
        log.warning("%s: %r failed its hash check; it is resent next pass", self.fs_id, cur.name)
        try:
            if cur.tmp is None:
                os.utime(cur.fd, ns=(0, 0))
        finally:
            os.close(cur.fd)
            os.close(cur.pfd)

    # --- end of pass --------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Re-apply directory times bottom-up, after everything below them changed."""
        self._drop_dirs()
        self.listing = None  # a listing left unfinished is not carried into the next pass
        dirs = self.journal.take_dirs()
        for path in sorted(dirs, key=lambda p: -p.count("/") - (1 if p else 0)):
            atime, mtime = dirs[path]
            try:
                fd = self._open_dir(split_relpath(path))
            except ProtocolError as e:
                log.warning("%s: directory %r not re-timed: %s", self.fs_id, path, e.message)
                continue
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
        removed = self._drop_stale_partials()
        passes = self.journal.end_pass(self.root_fd)
        return {"deleted": 0, "pass": passes, "directories": len(dirs), "stale_partials": removed}

    def _drop_stale_partials(self) -> int:
        """Remove the partial files no file of this (whole) pass was received into."""
        stale = self.partials_kept - self.partials_used
        self.partials_kept, self.partials_used = set(), set()
        removed = 0
        for parts, name in sorted(stale):
            try:
                fd = self._open_dir(list(parts))
            except ProtocolError:
                continue  # its directory went since
            try:
                st = _lstat(fd, name)
                if st is not None and stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=fd)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("%s: %d stale partial files removed", self.fs_id, removed)
        return removed


def _header_index(payload: bytes) -> int:
    """The index of a DATA/DELTA header frame; the agent sends exactly {"i":N}."""
    if payload[:5] == b'{"i":' and payload[-1:] == b"}" and payload[5:-1].isdigit():
        return int(payload[5:-1])
    return required_int(decode_json(payload), "i")


def _block_hashes(fd: int, size: int, block: int, alg: str) -> list[str]:
    return [digest for _, digest in block_digests(fd, size, block, alg)]
