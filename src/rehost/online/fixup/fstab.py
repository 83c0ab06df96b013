"""Point /etc/fstab at the destination's filesystems and swap.

Entries by UUID=, LABEL= or PARTUUID= that still name a destination filesystem stay as they
are (prepare keeps those identifiers). Entries by device name (/dev/sda1, /dev/xvda1,
/dev/nvme0n1p1, /dev/disk/by-id/...) would name nothing on virtio disks, so they are rewritten
to the destination's UUID=, which no later disk renumbering can break; when the name itself is
unknown, the mount point (or the only swap) tells which filesystem it was. The only-swap
fallback applies to identifiers and names of source disks alone (UUID=, sdX, xvdX, vdX, hdX,
nvme, mmcblk, /dev/disk/...): a zram swap is made at boot by its service and has nothing
to do with the disk's swap partition, so its line stays as it is. Options, dump/pass fields,
spacing and comments are kept.

An entry for a block device that was not migrated (a disk left out) would stop the boot in
emergency mode, so it is commented out, and logged; `noauto` entries (CD-ROMs) stay. An entry
for /, /boot, /usr or /var without `nofail` is refused instead: commented out, the system would
boot without its kernel or with an empty /var and look migrated.

Encrypted volumes (an active /etc/crypttab) are out of scope: the transfer copies their
decrypted contents onto plain filesystems, so the result would not match the crypttab the
initramfs acts on. They are refused instead of half-migrated.
"""

from __future__ import annotations

import re

from rehost.mountinfo import unescape
from rehost.online.fixup.common import Context
from rehost.online.fixup.plan import SWAP

BLOCK_SPEC = re.compile(r"^(UUID|LABEL|PARTUUID|PARTLABEL)=|^/dev/")
NOT_MIGRATED = "# rehost: not on the destination: "
# Device names a source disk's partition had; of /dev names, only these may name the swap.
SOURCE_DISK = re.compile(r"^/dev/((sd|xvd|vd|hd)[a-z]+|nvme\d+n\d+|mmcblk\d+)(p?\d+)?$|^/dev/disk/")
ZRAM = re.compile(r"^/dev/zram\d+$")
# Mount points a system cannot do without: never commented out, refused instead.
ESSENTIAL = ("/", "/boot", "/usr", "/var")


def _fix_line(ctx: Context, line: str) -> str:
    fields = line.split()
    if len(fields) < 2 or fields[0].startswith("#") or not BLOCK_SPEC.match(fields[0]):
        return line
    spec, mount = fields[0], unescape(fields[1])
    swap = len(fields) > 2 and fields[2] == SWAP
    found = ctx.plan.lookup(spec)
    if found is None and swap and ZRAM.match(spec):
        ctx.log(f"fstab: {spec} is a zram swap, made at boot; left as it is")
        return line
    if found is None and (not swap or not spec.startswith("/dev/") or SOURCE_DISK.match(spec)):
        by_mount = ctx.plan.by_mount(SWAP if swap else mount)
        found = (by_mount, False) if by_mount else None
    if found is None:
        options = fields[3].split(",") if len(fields) > 3 else []
        if "noauto" in options:
            ctx.log(f"fstab: {spec} on {mount} was not migrated; left as it is (noauto)")
            return line
        if (mount.rstrip("/") or "/") in ESSENTIAL and "nofail" not in options:
            raise ctx.fail(
                f"/etc/fstab mounts {spec} on {mount}, which is none of the migrated "
                "filesystems; commented out, the system would boot without it",
                hint=f"name {mount} in the source's /etc/fstab by UUID= (blkid shows it), or "
                "migrate the disk that holds it, and run again",
            )
        return NOT_MIGRATED + line
    fs, stable = found
    if stable:
        return line
    return re.sub(r"^(\s*)\S+", lambda m: m.group(1) + fs.dest.spec(), line, count=1)


def fix_fstab(ctx: Context) -> None:
    _refuse_crypttab(ctx)
    text = ctx.read("/etc/fstab")
    if text is None:
        raise ctx.fail("/etc/fstab is missing from the migrated root")
    ctx.write("/etc/fstab", "".join(_fix_line(ctx, ln) for ln in text.splitlines(keepends=True)))


def _refuse_crypttab(ctx: Context) -> None:
    text = ctx.read("/etc/crypttab") or ""
    active = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if active:
        raise ctx.fail(
            "/etc/crypttab lists encrypted volumes: " + "; ".join(active),
            hint="encrypted volumes are not supported; migrate a system without them, or "
            "remove the entries from /etc/crypttab on the source if they are unused",
        )
