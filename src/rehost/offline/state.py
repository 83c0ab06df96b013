"""The durable state of one import: where it is, what it imports, and how far it got.

One directory per (source, destination) pair holds:
- `state.json`: the source and its identity, the destination and its identity,
  the image's format and size, the status, the checkpoint (a flushed offset and
  the segment digests below it) and the final digest. It is replaced atomically
  (temp file, fsync, rename, fsync of the directory), so a crash leaves either
  the old state or the new one;
- `INCOMPLETE`: present from the moment the destination may have been changed
  until the import is done;
- `import.log`: every step of every run, and the traceback of anything unexpected;
- `lock`: held (flock) by the running import, so two runs cannot share the state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rehost.blob.source import RangeSource
from rehost.durable import atomic_write, fsync_dir
from rehost.errors import RehostError

_log = logging.getLogger("rehost.offline")

STATE_VERSION = 2  # 2: segment digests of rehost-content-v2
STATE_FILE = "state.json"
INCOMPLETE_FILE = "INCOMPLETE"
LOG_FILE = "import.log"
LOCK_FILE = "lock"

STATUSES = ("precheck", "writing", "verifying", "done", "failed")


class StateDirInUse(RehostError):
    code = "STATE_DIR_IN_USE"
    message = "the import's state directory is in use"
    default_hint = (
        "wait for the other import to finish, or pass a different --state-dir; "
        "a state directory belongs to one source and destination"
    )


class StateDirUnusable(RehostError):
    code = "STATE_DIR_UNUSABLE"
    message = "the import's state directory cannot be written"
    default_hint = (
        "free space on its filesystem or fix its permissions, or pass another --state-dir"
    )


def base_state_dir() -> Path:
    """$REHOST_STATE_DIR, or rehost's directory under $XDG_STATE_HOME (~/.local/state)."""
    base = os.environ.get("REHOST_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "rehost"
    )
    return Path(base)


def is_url(location: str) -> bool:
    return "://" in location


def display_location(location: str) -> str:
    """The location as it may be shown and stored: a URL's query (a presigned
    link's signature) is redacted, since it is a credential."""
    if not is_url(location):
        return os.path.abspath(location)
    parts = urlsplit(location)
    query = "<redacted>" if parts.query else ""
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def source_key(location: str) -> str:
    """What identifies a source across runs: a re-signed link to the same object is the same."""
    if not is_url(location):
        return os.path.abspath(location)
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def dest_key(dest: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(dest))


def import_key(source: str, dest: str | os.PathLike[str]) -> str:
    return hashlib.sha256(f"{source_key(source)}\0{dest_key(dest)}".encode()).hexdigest()


def default_state_dir(source: str, dest: str | os.PathLike[str]) -> Path:
    return base_state_dir() / "imports" / import_key(source, dest)


def source_identity(location: str, src: RangeSource) -> dict[str, Any]:
    """Size, plus what tells a changed object from the same one: ETag and Last-Modified for
    remote sources (where the source exposes them), mtime, ctime, inode and device for local
    files (the ctime because a write in place can put the mtime back, not the ctime)."""
    ident: dict[str, Any] = {"size": src.size}
    if is_url(location):
        for attr in ("etag", "last_modified", "version_id"):
            value = getattr(src, attr, None)
            if value is not None:
                ident[attr] = str(value)
        return ident
    st = os.stat(location)
    if stat.S_ISBLK(st.st_mode):
        ident["rdev"] = st.st_rdev
    else:
        ident.update(
            mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino, dev=st.st_dev
        )
    return ident


def dest_identity(path: str | os.PathLike[str], size: int) -> dict[str, Any] | None:
    """What tells the same destination from another one; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return {"kind": "block", "rdev": st.st_rdev, "size": size}
    return {"kind": "file", "dev": st.st_dev, "inode": st.st_ino, "size": size}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Checkpoint:
    offset: int = 0
    """Every guest byte below this offset is written and flushed to the destination."""
    segments: dict[int, str] = field(default_factory=dict)
    """Digests of the finished segments below `offset`, by segment index."""


@dataclass
class ImportState:
    key: str
    source: str
    dest: str
    source_identity: dict[str, Any] = field(default_factory=dict)
    dest_identity: dict[str, Any] | None = None
    dest_created: bool = False
    format: str = ""
    subformat: str = ""
    virtual_size: int = 0
    file_size: int = 0
    status: str = "precheck"
    step: str = "precheck"
    """The step in progress, or the one that failed."""
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    digest: str | None = None
    """The content digest of the guest bytes, once the write step has finished."""
    error: dict[str, str] | None = None
    runs: int = 0
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"]["segments"] = {
            str(k): v for k, v in sorted(self.checkpoint.segments.items())
        }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImportState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        cp = data.get("checkpoint") or {}
        segments = {int(k): _hex_digest(v) for k, v in dict(cp.get("segments") or {}).items()}
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["checkpoint"] = Checkpoint(int(cp.get("offset", 0)), segments)
        state = cls(**fields)
        if state.status not in STATUSES:
            raise ValueError(f"unknown status {state.status!r}")
        for name in ("runs", "virtual_size", "file_size"):  # a resume does arithmetic on them
            if type(getattr(state, name)) is not int:
                raise ValueError(f"{name} is not an integer")
        if state.digest is not None:
            _hex_digest(state.digest)
        return state


def _hex_digest(value: object) -> str:
    """A sha256 digest as hex, or ValueError: a resume feeds saved digests to bytes.fromhex."""
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError(f"{value!r} is not a digest")
    bytes.fromhex(value)
    return value


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """Setting up the state dir: a full or read-only filesystem is the operator's to fix."""
    try:
        yield
    except OSError as e:
        raise StateDirUnusable(f"{path}: {e.strerror}") from e


class StateDir:
    """The directory of one import, its state file, INCOMPLETE marker, log and lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_file = path / STATE_FILE
        self.incomplete_file = path / INCOMPLETE_FILE
        self.log_file = path / LOG_FILE
        self._lock_fd = -1

    def create(self) -> None:
        with _writable(self.path):
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load(self) -> ImportState | None:
        """The saved state, or None if there is none. Unreadable state raises ValueError."""
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return ImportState.from_json(data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{self.state_file} is unreadable: {e}") from e

    def save(self, state: ImportState) -> None:
        state.updated_at = now_iso()
        text = json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n"
        atomic_write(self.state_file, text.encode())

    def mark_incomplete(self, dest: str, source: str) -> None:
        if self.incomplete_file.exists():
            return
        text = (
            f"{dest} is incomplete: the import of {source} into it has not finished.\n"
            f"Run the same `rehost import` again to resume it; see {self.log_file}.\n"
        )
        atomic_write(self.incomplete_file, text.encode())

    def clear_incomplete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.incomplete_file.unlink()
            fsync_dir(self.path)

    @property
    def incomplete(self) -> bool:
        return self.incomplete_file.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock; refuse if another running import holds it."""
        with _writable(self.path / LOCK_FILE):
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise StateDirInUse(
                    f"another import (pid {holder}) is running with the state in {self.path}"
                ) from e
            with _writable(self.path / LOCK_FILE):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock


class ImportLog:
    """Appends timestamped lines to the import's log, and to rehost's own logger."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _writable(path):
            self._f = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def __call__(self, message: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        for line in message.rstrip("\n").splitlines() or [""]:
            self._f.write(f"{stamp} [{os.getpid()}] {line}\n")
        self._f.flush()
        _log.info("%s", message)

    def close(self) -> None:
        self._f.close()
