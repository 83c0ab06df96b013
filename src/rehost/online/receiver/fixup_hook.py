"""The hook point for the boot fixups: run on the migrated filesystems before they unmount.

The fixups (rehost.online.fixup: fstab and `root=` UUIDs, grub, an initramfs with the virtio
drivers, network reset to DHCP, cloud-init reset, SELinux relabel) need the destination's
filesystems still mounted, so `/v1/finalize` calls `run_fixups` after the final pass and
before `disks.finalize` syncs and unmounts them.

`plan_from_prepare` builds the fixups' plan from the source layout the agent sent (with its
`mounts` and `swap`, so the source's device names are known, and its `addresses`, so no
network configuration keeps them) and what prepare made of it
(STATE/layout.json: destination devices and UUIDs). prepare keeps filesystem UUIDs, labels
and GPT partition UUIDs, so both sides carry the same identifiers; the destination's kernel
device names are unknown until it boots, so fstab device names become UUID=.

`rehost receive --no-fixups` skips them (a data-only migration, or a system the caller fixes
up itself); so does a receiver that wrote into `--root` directories with no prepare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

from rehost.online.fixup import SWAP, FixupPlan, FsIds, FsMap
from rehost.online.fixup import run_fixups as fixup_tree

ESP_TYPES = ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "ef", "0xef")

Json = dict[str, Any]


def plan_from_prepare(
    layout: Json, result: Json, disks: Mapping[str, str]
) -> tuple[FixupPlan, dict[str, Path]]:
    """The fixup plan and the binds ({mount point: mounted at}) for a prepared migration.

    `layout` is the agent's layout (disks, mounts, swap), `result` prepare's result
    ({"filesystems": {fs_id: {device, uuid, mounted_at}}, "swap": [{device, uuid, label}]}),
    `disks` the receiver's disks (layout disk index -> destination device).
    """
    source_dev = {m.get("fs_id"): m.get("device", "") for m in layout.get("mounts", [])}
    source_swap = {
        s.get("uuid"): s.get("device", "") for s in layout.get("swap", []) if s.get("uuid")
    }
    dest_fs = result.get("filesystems", {})
    dest_swap = {s.get("uuid"): s.get("device", "") for s in result.get("swap", [])}
    maps: list[FsMap] = []
    binds: dict[str, Path] = {}
    boot_disk = ""
    firmware = "bios"
    esp = "/boot/efi"
    for index, disk in sorted(layout.get("disks", {}).items()):
        for p in disk.get("partitions", []):
            ids = {
                "uuid": p.get("uuid", "") or "",
                "label": p.get("label", "") or "",
                "partuuid": p.get("partuuid", "") or "",
            }
            if p.get("fs") == "swap":
                if not ids["uuid"] and not ids["label"]:
                    continue
                maps.append(
                    FsMap(
                        SWAP,
                        FsIds(**ids, device=source_swap.get(ids["uuid"], "")),
                        FsIds(**ids),
                    )
                )
                continue
            fs_id, mount = p.get("fs_id"), p.get("mount")
            if not fs_id or not mount or fs_id not in dest_fs:
                continue
            dest = dest_fs[fs_id]
            maps.append(
                FsMap(
                    mount,
                    FsIds(**ids, device=source_dev.get(fs_id, "")),
                    FsIds(**{**ids, "uuid": dest.get("uuid") or ids["uuid"]}),
                )
            )
            if mount == "/":
                boot_disk = disks.get(index, "")
            else:
                binds[mount] = Path(dest["mounted_at"])
            if str(p.get("type", "")).lower() in ESP_TYPES and p.get("fs") == "vfat":
                firmware, esp = "uefi", mount
    del dest_swap  # the destination swap keeps the source's UUID and label (prepare's mkswap)
    # `nic` stays unknown on purpose. This runs in the destination's rescue system, whose name
    # for the NIC (eth0 under net.ifnames=0, or ens3/enp0s3 by its own udev's naming scheme)
    # is only what the migrated system will use if both name NICs alike; a wrong name pins
    # ifupdown, netplan, networkd and keyfiles to a NIC that does not exist, where their
    # pattern always matches. The one system that cannot match by pattern, ifcfg with the
    # legacy network-scripts, is refused by the network step instead (see _check_ifcfg_name).
    plan = FixupPlan(
        filesystems=tuple(maps),
        boot_disk=boot_disk,
        firmware="uefi" if firmware == "uefi" else "bios",
        esp=esp,
        static_addresses=_addresses(layout.get("addresses")),
    )
    return plan, binds


def _addresses(listed: Any) -> tuple[str, ...]:
    """The source's addresses from its layout (an older agent sends none); what does not parse
    as an address is left out rather than matched as text."""
    found = []
    for item in listed if isinstance(listed, list) else []:
        try:
            ip_interface(item if isinstance(item, str) else "")
        except ValueError:
            continue
        found.append(item)
    return tuple(found)


def run_fixups(
    mounts: dict[str, Path],
    *,
    layout: Json | None = None,
    result: Json | None = None,
    disks: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, object] | None:
    """Fix up the migrated system so it boots on the destination; the fixups' report.

    `mounts` maps each transferred filesystem's fs_id ("root", "boot", "efi", "data-...") to
    the directory it is mounted at; `layout`, `result` and `disks` are the agent's layout,
    prepare's result and the receiver's disks (see `plan_from_prepare`). Without a layout or
    a prepare result (filesystems received into `--root` directories) nothing is done.
    Raises FixupFailed (a RehostError) to refuse "ready to boot".
    """
    if layout is None or result is None or "root" not in mounts:
        return None
    plan, binds = plan_from_prepare(layout, result, disks or {})
    return fixup_tree(mounts["root"], plan, log=log, binds=binds).to_dict()
