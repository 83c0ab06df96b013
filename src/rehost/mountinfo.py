"""Where things are mounted, from /proc/self/mountinfo (unescaped as the kernel escapes it).

Why a module: the receiver's disks, the fixups' chroot and fstab step all read such paths, and
twin parsers had drifted (one undid only some of the escapes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A path as mountinfo, mounts and fstab write it: space, tab, newline, backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point of this process's namespace, in mount order."""
    lines = Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines()
    return [unescape(line.split()[4]) for line in lines]


def is_mounted(where: Path) -> bool:
    return str(where) in mount_points()


def mounted_below(where: Path) -> list[str]:
    """The mount points at `where` or below it."""
    top = str(where).rstrip("/")
    return [p for p in mount_points() if p == top or p.startswith(top + "/")]


def mounts_of(devnos: set[str]) -> list[str]:
    """Where any mount namespace has a device (major:minor) mounted, ours first.

    A mount in another namespace (a container, a killed process's leftovers, a copy that an
    unshare took) holds the device too: mkfs refuses it, and a read-only one there makes our
    read-write mount fail with a bare EBUSY. Saying where is the whole diagnosis."""
    ours = os.readlink("/proc/self/ns/mnt")
    seen: set[str] = set()
    found: list[str] = []
    pids = sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name))
    for proc in [Path("/proc/self"), *pids]:
        try:
            ns = os.readlink(proc / "ns" / "mnt")
            if ns in seen:
                continue
            seen.add(ns)
            lines = (proc / "mountinfo").read_text(errors="surrogateescape").splitlines()
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue  # gone meanwhile, or a kernel thread's
        where = "" if ns == ours else f" (in the mount namespace of pid {proc.name}, {comm})"
        found += [unescape(f[4]) + where for f in map(str.split, lines) if f[2] in devnos]
    return found
