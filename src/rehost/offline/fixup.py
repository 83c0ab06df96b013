"""`rehost import ... --fixup`: the boot fixups on an imported disk (issue 5, offline case).

The imported disk holds the source's bytes unchanged, so every filesystem keeps its UUID,
label and partition UUID: the plan maps each filesystem to itself. What changes is the
hardware: the disk becomes a virtio disk (/dev/vdX), the NIC another, and the public IP stays
behind. The root filesystem is found from the partition table (the partition that holds
/etc/fstab and /etc/os-release), and the others are mounted where that fstab says.

fstab may name them by UUID=, LABEL=, PARTUUID= or by the source's kernel name (/dev/xvda2,
/dev/nvme0n1p2). A kernel name is partition N of the imported disk only when it is on the disk
the fstab's root entry names, and that entry's number is the root partition found here: the
image holds that one disk and no other (/dev/sdb1 is another disk, not migrated). When the root
is not named by device there is no telling which disk the names meant, so none is guessed; the
fstab step then comments out what is optional and refuses what the system needs.

The disk is attached to a loop device with its partitions (`losetup -P`); without udev the
partition nodes are made with mknod, and removed again afterwards with the loop device.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rehost.online.fixup import SWAP, FixupPlan, FixupReport, FsIds, FsMap, run_fixups
from rehost.online.fixup.common import FixupFailed
from rehost.online.fixup.plan import Firmware

STEP = "locate"  # the FixupFailed step for finding the filesystems
MOUNTABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
ESP_TYPES = ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "ef")
_BY = {
    "/dev/disk/by-uuid/": "UUID=",
    "/dev/disk/by-label/": "LABEL=",
    "/dev/disk/by-partuuid/": "PARTUUID=",
}

# A partition's kernel name: the disk (sda, xvdb, nvme0n1, mmcblk0) and the partition number.
_DEVICE_PART = re.compile(
    r"^/dev/(?:(?P<disk>(?:sd|xvd|vd|hd)[a-z]+)(?P<num>[1-9][0-9]*)"
    r"|(?P<pdisk>nvme[0-9]+n[0-9]+|mmcblk[0-9]+)p(?P<pnum>[1-9][0-9]*))$"
)


def _device_partition(spec: str) -> tuple[str, int] | None:
    """(disk, number) of a partition named by kernel name, e.g. /dev/xvda2 -> ("xvda", 2)."""
    m = _DEVICE_PART.match(spec)
    if m is None:
        return None
    if m.group("disk"):
        return m.group("disk"), int(m.group("num"))
    return m.group("pdisk"), int(m.group("pnum"))


@dataclass
class _Part:
    number: int
    node: str
    fstype: str
    uuid: str
    label: str
    partuuid: str
    ptype: str

    def ids(self, device: str) -> FsIds:
        return FsIds(uuid=self.uuid, label=self.label, partuuid=self.partuuid, device=device)

    def named_by(self, spec: str) -> bool:
        for prefix, kind in _BY.items():
            if spec.startswith(prefix):
                spec = kind + spec[len(prefix) :]
        kind, _, value = spec.partition("=")
        value = value.strip("\"'")
        if kind == "UUID":
            return bool(self.uuid) and value.lower() == self.uuid.lower()
        if kind == "LABEL":
            return bool(self.label) and value == self.label
        if kind == "PARTUUID":
            return bool(self.partuuid) and value.lower() == self.partuuid.lower()
        return False


def _run(*argv: str, step: str = STEP) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise FixupFailed(
            step,
            f"{' '.join(argv)} exited with {proc.returncode}",
            output=proc.stdout + proc.stderr,
        )
    return proc.stdout


def _blkid(dev: str) -> dict[str, str]:
    proc = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@contextlib.contextmanager
def _loop(dest: str) -> Iterator[str]:
    loop = _run("losetup", "-f", "-P", "--show", dest).strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        for node in Path("/dev").glob(Path(loop).name + "p*"):
            with contextlib.suppress(OSError):
                node.unlink()


def _partitions(loop: str) -> list[_Part]:
    from rehost.online.receiver.disks import _part_node

    subprocess.run(["partx", "-u", loop], capture_output=True)
    table = json.loads(_run("sfdisk", "--json", loop) or "{}").get("partitiontable", {})
    parts = []
    for p in table.get("partitions", []):
        number = int(p["node"][len(loop) :].lstrip("p"))
        node = _part_node(loop, number)
        probe = _blkid(node)
        parts.append(
            _Part(
                number,
                node,
                probe.get("TYPE", ""),
                probe.get("UUID", ""),
                probe.get("LABEL", ""),
                probe.get("PART_ENTRY_UUID", p.get("uuid", "")),
                str(p.get("type", "")).lower(),
            )
        )
    return parts


def _mount(dev: str, where: Path, mounted: list[Path], *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", *(["-o", ",".join(options)] if options else []), dev, str(where))
    mounted.append(where)


def _fstab(root: Path) -> list[tuple[str, str, str]]:
    """(spec, mount point, type) of each active fstab entry."""
    path = root / "etc/fstab"
    entries = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 3:
            entries.append((fields[0], fields[1], fields[2]))
    return entries


def _partition_name(disk: str, number: int) -> str:
    """/dev/xvda + 1 -> /dev/xvda1, /dev/nvme0n1 + 1 -> /dev/nvme0n1p1; "" without a disk."""
    if not disk:
        return ""
    return f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"


def _source_disk(
    entries: list[tuple[str, str, str]], root: _Part, say: Callable[[str], None]
) -> str | None:
    """The source's kernel name of the imported disk, if the fstab's root entry tells it.

    Only the root entry can: the image is the disk that holds the root, and its partition
    number must be the one found to hold the root, or the names are not this disk's."""
    spec = next((s for s, point, _ in entries if point == "/"), "")
    named = _device_partition(spec)
    if named is None:
        return None
    if named[1] != root.number:
        say(
            f"{STEP}: fstab names the root {spec}, but it is partition {root.number} of the "
            "image; device names in fstab are not matched to partitions"
        )
        return None
    return named[0]


def _by_device(spec: str, fstype: str, disk: str | None, parts: list[_Part]) -> _Part | None:
    """The partition of the imported disk that a kernel name (/dev/xvda2) named on the source."""
    named = _device_partition(spec)
    if disk is None or named is None or named[0] != disk:
        return None  # another disk (/dev/sdb1), not in the image
    part = next((p for p in parts if p.number == named[1]), None)
    if part is None or (fstype == SWAP) != (part.fstype == SWAP):
        return None  # no such partition, or a swap line for a filesystem (or back): no guess
    return part


def fixup_disk(
    dest: str | os.PathLike[str],
    *,
    firmware: Firmware = "bios",
    log: Callable[[str], None] | None = None,
) -> FixupReport:
    """Run the boot fixups on the disk (image file or block device) at `dest`."""
    say = log or (lambda _msg: None)
    mounted: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="rehost-fixup-") as tmp, _loop(os.fspath(dest)) as loop:
        work = Path(tmp)
        try:
            parts = _partitions(loop)
            root_part: _Part | None = None
            for p in parts:
                if p.fstype not in MOUNTABLE or p.fstype == "vfat":
                    continue
                probe = work / f"probe{p.number}"
                _mount(p.node, probe, mounted, "ro")
                is_root = (probe / "etc/fstab").is_file() and (
                    (probe / "etc/os-release").exists() or (probe / "usr/lib/os-release").exists()
                )
                _run("umount", str(probe))
                mounted.remove(probe)
                if is_root:
                    root_part = p
                    break
            if root_part is None:
                raise FixupFailed(
                    STEP,
                    f"no partition of {os.fspath(dest)} holds a root filesystem "
                    "(/etc/fstab and os-release)",
                )
            say(f"{STEP}: root filesystem on partition {root_part.number} ({root_part.fstype})")
            root = work / "root"
            _mount(root_part.node, root, mounted)
            entries = _fstab(root)
            disk = _source_disk(entries, root_part, say)
            root_dev = f"/dev/{disk}" if disk else ""
            maps = [
                FsMap(
                    "/",
                    root_part.ids(_partition_name(root_dev, root_part.number)),
                    root_part.ids(f"/dev/vda{root_part.number}"),
                )
            ]
            binds: dict[str, Path] = {}
            esp = "/boot/efi"
            for spec, point, fstype in entries:
                source_dev = ""
                found = next((p for p in parts if p.named_by(spec)), None)
                if found is None:
                    found = _by_device(spec, fstype, disk, parts)
                    source_dev = spec if found else ""
                if found is None or found is root_part:
                    continue  # the fstab step comments it out, or refuses if it is essential
                ids = found.ids(f"/dev/vda{found.number}")
                if fstype == "swap" or found.fstype == "swap":
                    maps.append(FsMap(SWAP, found.ids(source_dev), ids))
                    continue
                if not point.startswith("/") or found.fstype not in MOUNTABLE:
                    continue
                where = work / f"part{found.number}"
                _mount(found.node, where, mounted)
                binds[point] = where
                maps.append(FsMap(point, found.ids(source_dev), ids))
                if found.ptype in ESP_TYPES:
                    esp = point
                say(f"{STEP}: {point} on partition {found.number} ({found.fstype})")
            plan = FixupPlan(filesystems=tuple(maps), boot_disk=loop, firmware=firmware, esp=esp)
            return run_fixups(root, plan, log=say, binds=binds)
        finally:
            os.sync()
            for where in reversed(mounted):
                proc = subprocess.run(["umount", str(where)], capture_output=True)
                if proc.returncode != 0:
                    subprocess.run(["umount", "-l", str(where)], capture_output=True)
