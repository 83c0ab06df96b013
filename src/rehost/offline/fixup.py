"""`rehost import ... --fixup`: the boot fixups on an imported disk (issue 5, offline case).

The imported disk holds the source's bytes unchanged, so every filesystem keeps its UUID,
label and partition UUID: the plan maps each filesystem to itself. What changes is the
hardware: the disk becomes a virtio disk (/dev/vdX), the NIC another, and the public IP stays
behind. The root filesystem is found from the partition table (the partition that holds
/etc/fstab and /etc/os-release), and the others are mounted where that fstab says.

The disk is attached to a loop device with its partitions (`losetup -P`); without udev the
partition nodes are made with mknod, and removed again afterwards with the loop device.
"""

from __future__ import annotations

import contextlib
import json
import os
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
            maps = [FsMap("/", root_part.ids(""), root_part.ids(f"/dev/vda{root_part.number}"))]
            binds: dict[str, Path] = {}
            esp = "/boot/efi"
            for spec, point, fstype in _fstab(root):
                found = next((p for p in parts if p.named_by(spec)), None)
                if found is None and spec.startswith("/dev/") and not spec.startswith("/dev/disk/"):
                    found = None  # a device name: matched by the fixups' mount-point fallback
                if found is None or found is root_part:
                    continue
                ids = found.ids(f"/dev/vda{found.number}")
                if fstype == "swap" or found.fstype == "swap":
                    maps.append(FsMap(SWAP, found.ids(""), ids))
                    continue
                if not point.startswith("/") or found.fstype not in MOUNTABLE:
                    continue
                where = work / f"part{found.number}"
                _mount(found.node, where, mounted)
                binds[point] = where
                maps.append(FsMap(point, found.ids(""), ids))
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
