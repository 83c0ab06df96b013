"""What the fixups need to know about a migration: which source filesystem became which.

The fixups never probe disks themselves: the caller (the receiver's finalize, or an offline
import) knows the source layout and what prepare made of it, and passes it here. Keeping that
knowledge in one plain value makes every step testable on a synthetic tree.

prepare keeps filesystem UUIDs, labels and GPT partition UUIDs, so references by those usually
stay valid; device names (/dev/sda1, /dev/xvda1, /dev/nvme0n1p1) do not, since the destination's
disks are virtio (/dev/vdX). Anything that names a filesystem is therefore resolved through
`FixupPlan.lookup` and, where it must change, rewritten to the destination's UUID=.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Firmware = Literal["bios", "uefi"]
SWAP = "swap"  # the `mount` of a swap partition's FsMap

_BY = {
    "/dev/disk/by-uuid/": "UUID",
    "/dev/disk/by-label/": "LABEL",
    "/dev/disk/by-partuuid/": "PARTUUID",
}


@dataclass(frozen=True)
class FsIds:
    """The identifiers of one filesystem (or swap) on one side of the migration.

    `device` is the kernel name: on the source as the source knew it, on the destination as the
    migrated system will see it once booted (e.g. /dev/vda2).
    """

    uuid: str = ""
    label: str = ""
    partuuid: str = ""
    device: str = ""

    def spec(self) -> str:
        """The most robust way to name this filesystem in fstab or on a kernel command line."""
        return f"UUID={self.uuid}" if self.uuid else self.device


@dataclass(frozen=True)
class FsMap:
    """One migrated filesystem: its mount point on the source ("swap" for swap)."""

    mount: str
    source: FsIds
    dest: FsIds


@dataclass(frozen=True)
class FixupPlan:
    """Everything run_fixups needs besides the root tree.

    - `filesystems`: every migrated filesystem and swap partition, with "/" among them.
    - `boot_disk`: the destination disk grub is installed to on BIOS, as a device node where the
      fixups run (e.g. /dev/vda in the rescue system).
    - `firmware`: the destination's firmware; `esp`: the ESP's mount point inside the root.
    - `nic`: the destination's first NIC name if known (e.g. "ens3"); empty means unknown, and
      the network step then matches the first Ethernet NIC by pattern.
    - `static_addresses`: the source's static IPs ("203.0.113.10/24"), if known; the network
      step refuses to finish while any of them is still configured.
    """

    filesystems: tuple[FsMap, ...]
    boot_disk: str = ""
    firmware: Firmware = "bios"
    esp: str = "/boot/efi"
    nic: str = ""
    static_addresses: tuple[str, ...] = ()

    @property
    def root(self) -> FsMap | None:
        return next((m for m in self.filesystems if m.mount == "/"), None)

    @property
    def swaps(self) -> tuple[FsMap, ...]:
        return tuple(m for m in self.filesystems if m.mount == SWAP)

    def by_mount(self, mount: str) -> FsMap | None:
        """The filesystem mounted at `mount`; for "swap", the only swap if there is exactly one."""
        found = [m for m in self.filesystems if m.mount == mount]
        return found[0] if len(found) == 1 else None

    def lookup(self, spec: str) -> tuple[FsMap, bool] | None:
        """The filesystem that `spec` (UUID=, LABEL=, PARTUUID=, /dev/...) names, if migrated.

        The flag says whether `spec` already names the destination's filesystem by a stable
        identifier (UUID, LABEL or PARTUUID), so that it may stay as it is. A device name never
        counts as stable: it is rewritten to UUID= even when it happens to be right.
        """
        spec = spec.strip().strip("\"'")
        for prefix, kind in _BY.items():
            if spec.startswith(prefix):
                spec = f"{kind}={spec[len(prefix) :]}"
        kind, sep, value = spec.partition("=")
        if sep and kind in ("UUID", "LABEL", "PARTUUID"):
            value = value.strip("\"'")
            fold = (lambda s: s) if kind == "LABEL" else str.lower
            attr = kind.lower()
            for side, stable in (("dest", True), ("source", False)):
                for m in self.filesystems:
                    ids: FsIds = getattr(m, side)
                    mine = getattr(ids, attr)
                    if mine and fold(mine) == fold(value):
                        return m, stable
            return None
        if spec.startswith("/dev/"):
            for m in self.filesystems:
                if spec in (m.source.device, m.dest.device):
                    return m, False
        return None
