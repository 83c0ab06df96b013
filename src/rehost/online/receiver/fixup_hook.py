"""The hook point for the boot fixups: run on the migrated filesystems before they unmount.

Stage 3's fixups (fstab and `root=` UUIDs, grub, an initramfs with the virtio drivers,
network reset to DHCP, cloud-init reset, SELinux relabel) belong to a later issue. They need
the destination's filesystems still mounted, so `/v1/finalize` calls `run_fixups` after the
final pass and before `disks.finalize` syncs and unmounts them. Until then it does nothing.
"""

from __future__ import annotations

from pathlib import Path


def run_fixups(mounts: dict[str, Path]) -> None:
    """Fix up the migrated system so it boots on the destination (not yet: a no-op).

    `mounts` maps each transferred filesystem's fs_id ("root", "boot", "efi", "data-...") to
    the directory it is mounted at. It must raise a RehostError to refuse "ready to boot".
    """
    del mounts  # the fixups issue fills this in
