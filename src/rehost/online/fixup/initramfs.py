"""Rebuild every installed kernel's initramfs with the virtio drivers.

A source on Xen, Hyper-V, VMware or bare metal has an initramfs built for its own disk
controller (RHEL's dracut defaults to host-only images), so on a virtio destination the
kernel cannot find its root disk. Each kernel that has an image in /boot gets a new initramfs
with virtio_blk, virtio_scsi, virtio_net and virtio_pci:

- Debian family: the modules are listed in /etc/initramfs-tools/modules, which keeps them in
  every future rebuild too, then `update-initramfs -u -k VER` (`-c` when that kernel has no
  initramfs yet) per kernel; `-k all` would skip kernels without initramfs-tools state.
  /etc/initramfs-tools/conf.d/resume is pointed at the destination's swap (or `none`),
  because a stale RESUME= makes the initramfs wait for a device that never appears.
- RHEL family: `dracut -f --add-drivers "..." /boot/initramfs-VER.img VER` per kernel.
"""

from __future__ import annotations

import re

from rehost.online.fixup.common import Context
from rehost.online.fixup.distro import Distro

VIRTIO = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci")
MODULES_FILE = "/etc/initramfs-tools/modules"
RESUME_FILE = "/etc/initramfs-tools/conf.d/resume"


def kernels(ctx: Context) -> list[str]:
    """Versions under /lib/modules that have a kernel image (a module dir alone is leftover)."""
    host = ctx.path("/lib/modules")
    names = sorted(p.name for p in host.iterdir() if p.is_dir()) if host.is_dir() else []
    found = [
        k
        for k in names
        if ctx.path(f"/boot/vmlinuz-{k}").is_file()
        or ctx.path(f"/lib/modules/{k}/vmlinuz").is_file()
    ]
    for k in sorted(set(names) - set(found)):
        ctx.log(f"initramfs: /lib/modules/{k} has no kernel image; skipped")
    return found


def _ensure_modules(ctx: Context) -> None:
    text = ctx.read(MODULES_FILE) or ""
    listed = {
        ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    }
    missing = [m for m in VIRTIO if m not in listed]
    if missing:
        sep = "" if not text or text.endswith("\n") else "\n"
        block = "# virtio drivers for the migrated system (added by rehost)\n"
        ctx.write(MODULES_FILE, text + sep + block + "".join(f"{m}\n" for m in missing))


def _fix_resume_conf(ctx: Context) -> None:
    text = ctx.read(RESUME_FILE)
    if text is None:
        return

    def replace(m: re.Match[str]) -> str:
        value = m.group(2).strip("\"'")
        if value.lower() in ("none", "auto", ""):
            return m.group(0)
        found = ctx.plan.lookup(value)
        if found is None or found[0] not in ctx.plan.swaps:
            return f"{m.group(1)}none"
        return m.group(0) if found[1] else f"{m.group(1)}{found[0].dest.spec()}"

    ctx.write(RESUME_FILE, re.sub(r"(?m)^(\s*RESUME=)(\S*)", replace, text))


def fix_initramfs(ctx: Context, distro: Distro) -> None:
    versions = kernels(ctx)
    if not versions:
        raise ctx.fail("no installed kernel: /lib/modules/* has no matching /boot/vmlinuz-*")
    if distro.family == "debian":
        _ensure_modules(ctx)
        _fix_resume_conf(ctx)
        for k in versions:
            mode = "-u" if ctx.path(f"/boot/initrd.img-{k}").exists() else "-c"
            ctx.run("update-initramfs", mode, "-k", k)
    else:
        for k in versions:
            ctx.run(
                "dracut", "-f", "--add-drivers", " ".join(VIRTIO), f"/boot/initramfs-{k}.img", k
            )
