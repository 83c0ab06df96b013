"""The receiver's per-filesystem journal: what has been committed, durably.

A DATA batch is acknowledged only after its files are on disk (`syncfs` of the target
filesystem) and this journal is replaced atomically, so a crash at any point leaves either
the old or the new journal, never a torn one, and never a journal ahead of the data.
Directories' times are appended to a side file during a pass and re-applied bottom-up by
`finish`, after everything below them has changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import time
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    """Flush one filesystem (the one `fd` is on) to stable storage."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: write a temp file, fsync it, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Journal:
    """STATE/journal/{fs_id}.json and the pass's directory list beside it."""

    def __init__(self, state_dir: Path, fs_id: str) -> None:
        self.dir = state_dir / "journal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{fs_id}.json"
        self.dirs_path = self.dir / f"{fs_id}.dirs"
        self.state: dict[str, Any] = {
            "fs_id": fs_id,
            "passes": 0,
            "batches": 0,
            "entries": 0,
            "files": 0,
            "bytes": 0,
            "updated": 0.0,
        }
        if self.path.exists():
            self.state.update(json.loads(self.path.read_text()))

    def commit(self, root_fd: int, **added: int) -> None:
        """Sync the target filesystem, then record the batch (data before journal)."""
        syncfs(root_fd)
        for key, value in added.items():
            self.state[key] = int(self.state.get(key, 0)) + value
        self.state["updated"] = time.time()
        write_atomic(self.path, json.dumps(self.state, indent=1).encode())

    def add_dirs(self, rows: list[tuple[str, int, int]]) -> None:
        """Remember directories' (path, atime_ns, mtime_ns) for `finish`."""
        if rows:
            with open(self.dirs_path, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))

    def take_dirs(self) -> dict[str, tuple[int, int]]:
        """The directories recorded this pass (the last record of each wins)."""
        out: dict[str, tuple[int, int]] = {}
        if self.dirs_path.exists():
            with open(self.dirs_path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    try:
                        path, atime, mtime = json.loads(line)
                    except ValueError:
                        continue  # a torn last line after a crash
                    out[path] = (int(atime), int(mtime))
        return out

    def end_pass(self, root_fd: int) -> int:
        self.dirs_path.unlink(missing_ok=True)
        self.commit(root_fd, passes=1)
        return int(self.state["passes"])
