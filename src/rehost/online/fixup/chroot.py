"""Run commands inside the migrated system, with /dev, /proc and /sys bind-mounted.

grub-install, update-grub, update-initramfs and dracut must run as the migrated system's own
tools (its grub modules, its kernels, its hooks), so they run under chroot. They probe devices
and mounts, hence the bind mounts of /dev, /proc and /sys; separate filesystems of the
migrated system (/boot, /boot/efi) are bound into the root first, so that the tools see the
tree they will boot from. Everything mounted here is unmounted again on the way out, in
reverse order, even when a command failed.

Commands go through a `Runner`, so that tests can record them instead of running them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from rehost.mountinfo import is_mounted, mounted_below
from rehost.online.fixup.common import FixupFailed, Result, Runner, confined

# A clean, predictable environment: the rescue system's locale and PATH mean nothing inside.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}
COMMAND_TIMEOUT = 1800  # dracut or update-initramfs for several kernels on a slow disk
SYSTEM_MOUNTS = ("/dev", "/proc", "/sys")


def _host(argv: Sequence[str], timeout: float = 60) -> Result:
    """Run a command in a process group of its own: a timeout ends the whole tree it started
    (dracut's and update-initramfs's children), which would otherwise go on writing into the
    migrated system after the step failed, and keep its filesystems busy."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        return Result(127, str(e))
    with proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, _ = proc.communicate(timeout=10)  # the pipe closes once the group is gone
            except subprocess.TimeoutExpired as e:  # one left the group (setsid), with the pipe
                out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output
            return Result(124, f"{out or ''}timed out after {timeout:.0f} s")
        return Result(proc.returncode, out)


class Chroot:
    """`with Chroot(root, binds) as run:` mounts, yields a runner into `root`, unmounts.

    `binds` maps a mount point inside the migrated system ("/boot") to the host directory that
    holds that filesystem; they are bound before /dev, /proc and /sys.
    """

    def __init__(
        self,
        root: Path,
        binds: Mapping[str, Path] | None = None,
        log: Callable[[str], None] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.root = root
        self.binds = dict(sorted((binds or {}).items(), key=lambda kv: kv[0].count("/")))
        self.log = log or (lambda _msg: None)
        self.timeout = timeout
        self.mounted: list[Path] = []

    def __enter__(self) -> Runner:
        try:
            for inside, source in [*self.binds.items(), *((p, Path(p)) for p in SYSTEM_MOUNTS)]:
                where = confined(self.root, inside)
                where.mkdir(parents=True, exist_ok=True)
                self._clear(where)
                # private: on a system whose mounts are shared (systemd's default) a bind
                # joins its source's peer group, so the host's later mounts below /dev would
                # show here, keep the bind busy, and go with its lazy unmount
                res = _host(["mount", "--bind", "--make-private", str(source), str(where)])
                if res.returncode != 0:
                    raise FixupFailed(
                        "chroot", f"cannot bind {source} to {inside}", output=res.output
                    )
                self.mounted.append(where)
                self.log(f"chroot: bound {source} at {inside}")
        except BaseException:
            self._unmount()
            raise
        return self.run

    def _clear(self, where: Path) -> None:
        """Unmount what an interrupted run left bound here (a receiver killed during the
        fixups leaves /dev, /proc, /sys bound in the migrated root): bound over it again,
        it kept the root busy, and every later finalize failed to unmount it."""
        if not mounted_below(where):
            return
        res = _host(["umount", "-R", str(where)])
        if res.returncode != 0:
            res = _host(["umount", "-R", "-l", str(where)])
        if mounted_below(where):
            raise FixupFailed(
                "chroot", f"{where} is still mounted from an earlier run", output=res.output
            )
        self.log(f"chroot: unmounted what an earlier run left at {where}")

    def run(self, argv: Sequence[str]) -> Result:
        self.log("chroot: $ " + " ".join(argv))
        res = _host(["chroot", str(self.root), *argv], timeout=self.timeout)
        if res.returncode != 0:
            self.log(f"chroot: exit {res.returncode}: {res.output.strip()[-2000:]}")
        return res

    def _unmount(self) -> list[str]:
        errors = []
        while self.mounted:
            where = self.mounted.pop()
            res = _host(["umount", str(where)])
            if res.returncode != 0 and is_mounted(where):
                # Something in the chroot still holds it (a daemon a hook started): detach it
                # so the disks can still be unmounted and the user's system is not left bound.
                lazy = _host(["umount", "-l", str(where)])
                errors.append(
                    f"{where}: {res.output.strip()} (lazy unmount: exit {lazy.returncode})"
                )
        return errors

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self._unmount()
        if errors and exc is None:
            raise FixupFailed(
                "chroot", "cleaning up the bind mounts failed", output="\n".join(errors)
            )
        for error in errors:
            self.log(f"chroot: unmount failed: {error}")
