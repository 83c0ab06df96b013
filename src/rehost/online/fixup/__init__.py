"""Boot fixups: make a migrated root tree boot on its destination.

A copied system still believes it runs on the source: its fstab and kernel command line name
the source's devices, its boot code is not on the new disk, its initramfs lacks the virtio
drivers, its network is the source's static IP on a MAC-pinned NIC, and cloud-init remembers
the source's instance. run_fixups corrects each of these in order, on the migrated root
(with its /boot and ESP inside), running the system's own tools in a chroot. Each step logs
what it changed and raises FixupFailed when it cannot apply: a system that may not boot is
never reported ready. See docs/fixups.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from rehost.online.fixup.bootloader import fix_bootloader
from rehost.online.fixup.chroot import Chroot
from rehost.online.fixup.common import (
    Change,
    Context,
    FixupFailed,
    FixupReport,
    Result,
    Runner,
)
from rehost.online.fixup.distro import detect
from rehost.online.fixup.fstab import fix_fstab
from rehost.online.fixup.identity import fix_identity
from rehost.online.fixup.initramfs import fix_initramfs
from rehost.online.fixup.network import fix_network
from rehost.online.fixup.plan import SWAP, FixupPlan, FsIds, FsMap

__all__ = [
    "SWAP",
    "Change",
    "Chroot",
    "FixupFailed",
    "FixupPlan",
    "FixupReport",
    "FsIds",
    "FsMap",
    "Result",
    "Runner",
    "run_fixups",
]


def _check_plan(plan: FixupPlan) -> None:
    root = plan.root
    if root is None or not root.dest.spec().startswith("UUID="):
        raise FixupFailed("plan", "the plan has no root filesystem (mount /) with a UUID")
    if plan.firmware not in ("bios", "uefi"):
        raise FixupFailed("plan", f"unknown firmware {plan.firmware!r} (bios or uefi)")


def _apply(ctx: Context) -> FixupReport:
    try:
        return _steps(ctx)
    except FixupFailed as e:  # what was changed before it stays changed: say what it was
        e.changes = ctx.report.changes_list()
        raise


def _steps(ctx: Context) -> FixupReport:
    ctx.step = "distro"
    distro = detect(ctx)
    ctx.report.distro = distro.name
    ctx.log(f"distro: {distro.name} ({distro.family} family)")
    ctx.step = "fstab"
    fix_fstab(ctx)
    ctx.step = "network"
    fix_network(ctx)
    ctx.step = "identity"
    fix_identity(ctx)
    ctx.step = "initramfs"
    fix_initramfs(ctx, distro)
    ctx.step = "bootloader"
    fix_bootloader(ctx, distro)
    return ctx.report


def run_fixups(
    root: Path,
    plan: FixupPlan,
    runner: Runner | None = None,
    log: Callable[[str], None] | None = None,
    binds: Mapping[str, Path] | None = None,
) -> FixupReport:
    """Fix up the migrated system at `root` so that it boots on the destination.

    Without a `runner`, commands run in a chroot of `root` with /dev, /proc and /sys bound,
    and with `binds` (mount point in the system -> host directory, e.g. {"/boot": ...}) bound
    first; everything is unmounted afterwards. With a runner, `root` must already hold the
    complete tree and commands go to the runner (tests record them).
    """
    _check_plan(plan)
    say = log or (lambda _msg: None)
    if runner is not None:
        return _apply(Context(root, plan, runner, say, FixupReport()))
    with Chroot(root, binds, log=say) as chroot_runner:
        return _apply(Context(root, plan, chroot_runner, say, FixupReport()))
