"""Where things are mounted, from /proc/self/mountinfo (unescaped as the kernel escapes it).

Why a module: the receiver's disks, the fixups' chroot and fstab step all read such paths, and
twin parsers had drifted (one undid only some of the escapes).
"""

from __future__ import annotations

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
