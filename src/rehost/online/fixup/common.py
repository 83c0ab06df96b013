"""What every fixup step shares: the typed error, the report, and edits confined to the root.

Every edit goes through `Context`: it resolves paths the way the migrated system will (an
absolute symlink such as /etc/os-release -> /usr/lib/os-release must lead to the migrated
file, never to the rescue system's own), writes atomically while keeping the file's mode,
owner and xattrs (SELinux labels), and logs and reports each change line by line. Commands go
through the runner and a non-zero exit becomes FixupFailed naming the step and the output:
a half-applied fixup must never pass as "ready to boot".
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rehost.errors import RehostError
from rehost.online.fixup.plan import FixupPlan

MAX_SYMLINKS = 40


class FixupFailed(RehostError):
    code = "FIXUP_FAILED"
    message = "a boot fixup could not be applied"
    default_hint = (
        "the migrated system would not boot reliably; read the step's output, fix the cause "
        "on the source (or in the destination's rescue system) and run the finalize again"
    )

    def __init__(self, step: str, reason: str, *, output: str = "", hint: str | None = None):
        self.step = step
        self.output = output.strip()
        self.changes: list[dict[str, object]] = []
        """What the steps before the failure changed (FixupReport.to_dict's changes)."""
        detail = f"{step}: {reason}"
        super().__init__(f"{detail}\n{self.output}" if self.output else detail, hint=hint)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "step": self.step, "output": self.output,
                "changes": self.changes}  # fmt: skip


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str  # stdout and stderr, interleaved


class Runner(Protocol):
    """Runs argv inside the migrated system (see chroot.Chroot)."""

    def __call__(self, argv: Sequence[str]) -> Result: ...


@dataclass(frozen=True)
class Change:
    """One changed region of one file (paths as the migrated system sees them)."""

    step: str
    path: str
    before: tuple[str, ...]
    after: tuple[str, ...]


@dataclass
class FixupReport:
    distro: str = ""
    changes: list[Change] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"distro": self.distro, "changes": self.changes_list(), "commands": self.commands}

    def changes_list(self) -> list[dict[str, object]]:
        return [
            {"step": c.step, "path": c.path, "before": list(c.before), "after": list(c.after)}
            for c in self.changes
        ]


def confined(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path of `path` as seen from inside `root`: symlinks resolve within root."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        if here.is_symlink() and (todo or follow_last):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise FixupFailed("paths", f"too many levels of symbolic links in {path}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    return root.joinpath(*done)


def _diff(before: str, after: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    a, b = before.splitlines(), after.splitlines()
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return [
        (tuple(a[i1:i2]), tuple(b[j1:j2]))
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def _replace_keeping_attrs(path: Path, data: bytes) -> None:
    st = path.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.rehost-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
            for name in os.listxattr(path):
                os.setxattr(tmp, name, os.getxattr(path, name))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Context:
    """One run of the fixups: the root, the plan, the runner, the log and the report."""

    root: Path
    plan: FixupPlan
    runner: Runner
    log: Callable[[str], None]
    report: FixupReport
    step: str = ""

    def path(self, path: str, *, follow_last: bool = True) -> Path:
        return confined(self.root, path, follow_last=follow_last)

    def read(self, path: str) -> str | None:
        host = self.path(path)
        if not host.is_file():
            return None
        return host.read_bytes().decode("utf-8", "surrogateescape")

    def listdir(self, path: str, suffix: str = "") -> list[str]:
        """Regular files in a directory of the root, sorted, as paths inside the root."""
        host = self.path(path)
        if not host.is_dir():
            return []
        return [
            f"{path.rstrip('/')}/{p.name}"
            for p in sorted(host.iterdir())
            if p.name.endswith(suffix) and self.path(f"{path}/{p.name}").is_file()
        ]

    def _record(self, path: str, before: tuple[str, ...], after: tuple[str, ...]) -> None:
        self.report.changes.append(Change(self.step, path, before, after))
        shown = " | ".join(before) or "(nothing)"
        self.log(f"{self.step}: {path}: {shown} -> {' | '.join(after) or '(removed)'}")

    def write(self, path: str, text: str) -> None:
        """Write `text` to `path` (inside the root) if it differs, logging each changed region."""
        old = self.read(path)
        if old == text:
            return
        host = self.path(path)
        data = text.encode("utf-8", "surrogateescape")
        if old is None:
            host.parent.mkdir(parents=True, exist_ok=True)
            host.write_bytes(data)
        else:
            _replace_keeping_attrs(host, data)
        for before, after in _diff(old or "", text):
            self._record(path, before, after)
        if old is None and not text:
            self._record(path, (), ("(empty file created)",))

    def remove(self, path: str) -> None:
        """Remove a file, symlink or directory tree inside the root, logging what it was."""
        host = self.path(path, follow_last=False)
        if host.is_symlink():
            what = f"symlink -> {os.readlink(host)}"
            host.unlink()
        elif host.is_dir():
            what = "directory"
            shutil.rmtree(host)
        elif host.exists():
            what = "file"
            host.unlink()
        else:
            return
        self._record(path, (what,), ())

    def copy(self, source: str, dest: str) -> None:
        """Copy a file inside the root (binaries: logged by name, not by content)."""
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.path(source), target)
        self._record(dest, (), (f"copy of {source}",))

    def run(self, *argv: str) -> str:
        self.report.commands.append(list(argv))
        self.log(f"{self.step}: $ {' '.join(argv)}")
        res = self.runner(argv)
        if res.returncode != 0:
            raise FixupFailed(
                self.step, f"`{' '.join(argv)}` exited {res.returncode}", output=res.output
            )
        return res.output

    def fail(self, reason: str, *, hint: str | None = None) -> FixupFailed:
        return FixupFailed(self.step, reason, hint=hint)
