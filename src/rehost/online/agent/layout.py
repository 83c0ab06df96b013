"""Discover the source server's disk layout: partition tables, filesystems, mounts and swap.

The receiver recreates this layout on the destination (docs/online-protocol.md, "Layout"), so
it records what a boot needs kept: the partition table type and disk id, partition types,
flags, GPT names and partition UUIDs, filesystem UUIDs and labels, and the filesystem feature
sets (a filesystem made by the rescue system's newer mkfs must still mount under the source's
older kernel and grub). What rehost cannot recreate (LVM, md RAID, btrfs, a filesystem on a
bare disk, ...) is listed under "unsupported", so the precheck fails with a clear message.

Runs on the source: Python 3.6+, standard library only. Mounts come from
/proc/self/mountinfo, devices from /sys/class/block (no udev needed), the partition table from
`sfdisk --json` or, where sfdisk is too old for that (CentOS 7), from the disk itself.

Paths in the layout are in the protocol's wire form (protocol.path_to_wire: the bytes as UTF-8,
undecodable bytes escaped), whatever the locale: Python 3.6 under LANG=C would otherwise fail
on the first non-ASCII mount point. Each "path" is the host path as os functions take it.
"""

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import zlib
from typing import Any, Dict, List, Optional, Set, Tuple

from rehost.online.protocol import DOS_EXTENDED, path_to_wire, wire_to_path

SUPPORTED_FS = ("ext2", "ext3", "ext4", "xfs", "vfat")
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# Mounted from block devices but nothing to migrate: read-only images and optical media.
IGNORED_BLOCK_FS = ("squashfs", "iso9660", "udf", "erofs", "cramfs")
# Local filesystems that are not on one block device: rehost cannot recreate them.
UNSUPPORTED_NONBLOCK_FS = ("zfs", "btrfs", "bcachefs")
# A running container's root (Docker, containerd, podman): its layers are directories of
# the filesystem below, which migrates; the union itself is remade when the container starts.
LAYERED_FS = ("overlay", "aufs")
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "virtiofs")
# GPT attribute bits sfdisk names (bit 0, 1, 2) and shows as such in --json.
GPT_ATTR_NAMES = {0: "RequiredPartition", 1: "NoBlockIOProtocol", 2: "LegacyBIOSBootable"}
# ext features mke2fs cannot be asked for: they describe state, not format.
EXT_STATE_FEATURES = ("needs_recovery", "orphan_present", "journal_dev", "snapshot_bitmap")

Json = Dict[str, Any]


def fs_id_for(mount: str) -> str:
    """The id the protocol uses for a source mount point: root, boot, efi or data-<name>."""
    known = {"/": "root", "/boot": "boot", "/boot/efi": "efi"}
    if mount in known:
        return known[mount]
    name = re.sub(r"[^A-Za-z0-9._]+", "-", mount).strip("-.")
    if len(name) > 180:  # the receiver takes 200 characters (protocol.valid_fs_id)
        name = (
            name[:160]
            + "-"
            + hashlib.sha256(mount.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        )
    return "data-" + (name or "x")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _proc_lines(path: str) -> List[str]:
    """A /proc table holding paths, in wire form: the locale's codec (ASCII under LANG=C on
    Python 3.6) would fail on any non-ASCII mount point on the host."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.readlines()


def host_path(wire: str) -> str:
    """A wire-form path as os functions and subprocess take it, whatever the locale."""
    return os.fsdecode(wire_to_path(wire))


def _run(args: List[str]) -> Tuple[int, str]:
    """(status, stdout in wire form): labels and dumpe2fs's "Last mounted on" may be non-ASCII."""
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        return 127, str(e)
    out, _ = proc.communicate()
    return proc.returncode, path_to_wire(out)


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def _relative(path: str, root: str) -> str:
    if root == "/":
        return path
    rest = path[len(root) :]
    return rest if rest else "/"


class _Mount:
    def __init__(self, fields: List[str]) -> None:
        sep = fields.index("-")
        self.id, self.parent = fields[0], fields[1]
        self.devno = fields[2]
        self.root = _unescape(fields[3])
        self.point = _unescape(fields[4])
        self.fstype = fields[sep + 1]
        self.source = _unescape(fields[sep + 2])
        self.hidden_by = None  # type: Optional[str]


def _hide(mounts: List[_Mount]) -> None:
    """Set hidden_by: the point of the mount that makes a mount unreachable by its path.

    A mount is hidden by one stacked on its point (its child at the same point), or when the
    path to it is cut off: by a sibling mounted later over a directory above its point (p3 at
    /var over p2 at /var/log, both children of the same mount), or with its parent's path.
    Its point then leads into another filesystem, which must not be read as if it were this.
    """
    by_id = {m.id: m for m in mounts}
    children = {}  # type: Dict[str, List[_Mount]]
    for m in mounts:
        children.setdefault(m.parent, []).append(m)
    cut = {}  # type: Dict[str, Optional[str]]

    def cut_by(m: _Mount) -> Optional[str]:
        if m.id not in cut:
            cut[m.id] = None  # before the parent: a namespace's root may be its own parent
            above = [
                c.point
                for c in children.get(m.parent, [])
                if c.point != m.point and _under(m.point, c.point)
            ]
            parent = by_id.get(m.parent)
            cut[m.id] = above[0] if above else cut_by(parent) if parent else None
        return cut[m.id]

    for m in mounts:
        over = [c.point for c in children.get(m.id, []) if c.point == m.point]
        m.hidden_by = over[0] if over else cut_by(m)


def _mounts(root: str) -> List[_Mount]:
    """Mounts at or below root, with hidden_by set (see _hide).

    An automount (autofs, e.g. systemd's /boot/efi) is triggered first, so that the real
    filesystem behind it shows.
    """
    mine = []  # type: List[_Mount]
    for attempt in range(2):
        every = [_Mount(line.split()) for line in _proc_lines("/proc/self/mountinfo")]
        _hide(every)
        mine = [m for m in every if _under(m.point, root)]
        autofs = [m.point for m in mine if m.fstype == "autofs" and m.hidden_by is None]
        if not autofs or attempt:
            break
        for point in autofs:
            with contextlib.suppress(OSError):
                os.listdir(wire_to_path(point))
    return [m for m in mine if m.fstype != "autofs"]


def _sysfs_for(m: _Mount) -> Optional[str]:
    """The /sys directory of the block device behind a mount, if it is one."""
    path = "/sys/dev/block/" + m.devno
    if not m.devno.startswith("0:") and os.path.exists(path):
        return os.path.realpath(path)
    # btrfs and fuseblk report an anonymous device number: go by the source node.
    try:
        st = os.stat(wire_to_path(m.source))
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    path = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _node(name: str, fallback: str = "") -> str:
    path = "/dev/" + name
    return path if os.path.exists(path) or not fallback else fallback


def _blkid(dev: str) -> Dict[str, str]:
    """Low-level probe (no cache): TYPE, UUID, LABEL, VERSION of what is on the device."""
    code, out = _run(["blkid", "-p", "-o", "export", dev])
    if code not in (0, 2):
        return {}
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        info[key] = value
    return info


def _ext_options(dev: str) -> Json:
    code, out = _run(["dumpe2fs", "-h", dev])
    opts = {}  # type: Json
    if code != 0:
        return opts
    for line in out.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "Filesystem features":
            feats = [f for f in value.split() if f not in EXT_STATE_FEATURES]
            opts["features"] = feats
        elif key == "Block size":
            opts["block_size"] = int(value)
        elif key == "Inode size":
            opts["inode_size"] = int(value)
    return opts


def _xfs_options(mount_path: str) -> Json:
    """xfs_info's on-disk format switches, so the new xfs mounts under the source's kernel."""
    code, out = _run(["xfs_info", mount_path])
    opts = {}  # type: Json
    if code != 0:
        return opts
    for key, value in re.findall(r"\b([a-z0-9_]+)=(\d+)\b", out):
        if key in (
            "crc",
            "finobt",
            "sparse",
            "rmapbt",
            "reflink",
            "bigtime",
            "inobtcount",
        ) or key in ("ftype", "nrext64"):
            opts[key] = int(value)
    return opts


# -- partition tables --------------------------------------------------------------------


def _sfdisk_table(disk: str) -> Optional[Json]:
    code, out = _run(["sfdisk", "--json", disk])
    if code != 0:
        return None
    try:
        table = json.loads(out)["partitiontable"]  # type: Json
    except (ValueError, KeyError):
        return None
    return table


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack("<IHH", raw[:8])
    tail = raw[8:].hex().upper()
    return f"{a:08X}-{b:04X}-{c:04X}-{tail[:4]}-{tail[4:]}"


def parse_table(disk: str, sector: int = 512) -> Optional[Json]:
    """Read a GPT or MBR (with logical partitions) from the disk, in sfdisk --json's shape.

    The fallback for an sfdisk without --json (util-linux < 2.26, e.g. CentOS 7).
    """
    with open(disk, "rb") as f:
        mbr = f.read(sector)
        if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
            return None
        entries = [mbr[446 + 16 * i : 462 + 16 * i] for i in range(4)]
        if any(e[4] == 0xEE for e in entries):
            f.seek(sector)
            hdr = f.read(sector)
            if hdr[:8] != b"EFI PART":
                return None
            lba, count, esize = struct.unpack("<QII", hdr[72:88])
            f.seek(lba * sector)
            table = f.read(count * esize)
            if zlib.crc32(table) & 0xFFFFFFFF != struct.unpack("<I", hdr[88:92])[0]:
                return None
            parts = []
            for i in range(count):
                e = table[i * esize : (i + 1) * esize]
                if e[:16] == b"\0" * 16:
                    continue
                first, last, attrs = struct.unpack("<QQQ", e[32:56])
                part = {
                    "node": _part_node(disk, i + 1),
                    "start": first,
                    "size": last - first + 1,
                    "type": _guid(e[:16]),
                    "uuid": _guid(e[16:32]),
                }  # type: Json
                name = e[56:128].decode("utf-16-le").rstrip("\0")
                if name:
                    part["name"] = name
                names = [GPT_ATTR_NAMES[b] for b in sorted(GPT_ATTR_NAMES) if attrs >> b & 1]
                names += [f"GUID:{b}" for b in range(48, 64) if attrs >> b & 1]
                if names:
                    part["attrs"] = " ".join(names)
                parts.append(part)
            return {
                "label": "gpt",
                "id": _guid(hdr[56:72]),
                "sectorsize": sector,
                "partitions": parts,
            }
        ident = struct.unpack("<I", mbr[440:444])[0]
        parts = []
        for i, e in enumerate(entries):
            kind = e[4]
            start, size = struct.unpack("<II", e[8:16])
            if kind == 0 or size == 0:
                continue
            part = {
                "node": _part_node(disk, i + 1),
                "start": start,
                "size": size,
                "type": f"{kind:x}",
            }
            if e[0] == 0x80:
                part["bootable"] = True
            parts.append(part)
            if f"{kind:x}" in DOS_EXTENDED:
                number, ebr = 5, start
                while ebr and number < 64:
                    f.seek(ebr * sector)
                    block = f.read(512)
                    if block[510:512] != b"\x55\xaa":
                        break
                    log, nxt = block[446:462], block[462:478]
                    lstart, lsize = struct.unpack("<II", log[8:16])
                    if log[4] and lsize:
                        logical = {
                            "node": _part_node(disk, number),
                            "start": ebr + lstart,
                            "size": lsize,
                            "type": f"{log[4]:x}",
                        }  # type: Json
                        if log[0] == 0x80:
                            logical["bootable"] = True
                        parts.append(logical)
                        number += 1
                    nstart = struct.unpack("<I", nxt[8:12])[0]
                    ebr = start + nstart if nxt[4] and nstart else 0
        return {"label": "dos", "id": f"0x{ident:08x}", "sectorsize": sector, "partitions": parts}


def _part_node(disk: str, number: int) -> str:
    return disk + ("p" if disk[-1].isdigit() else "") + str(number)


def _number(node: str) -> int:
    return int(re.search(r"(\d+)$", node).group(1))  # type: ignore


def _flags(label: str, part: Json) -> List[str]:
    flags = []
    kind = str(part.get("type", "")).upper()
    if label == "gpt":
        if kind == BIOS_BOOT_GUID:
            flags.append("bios_grub")
        if kind == ESP_GUID:
            flags.append("esp")
        if "LegacyBIOSBootable" in part.get("attrs", ""):
            flags.append("legacy_boot")
    else:
        if part.get("bootable"):
            flags.append("boot")
        if kind == "EF":
            flags.append("esp")
    return flags


# -- discovery -------------------------------------------------------------------------


class _Found:
    """What discover() collects before it turns into JSON."""

    def __init__(self) -> None:
        self.mounts = []  # type: List[Json]
        self.unsupported = []  # type: List[str]
        self.ignored = []  # type: List[Json]
        self.disks = []  # type: List[str]  # kernel names, system disk first


def _collect_mounts(root: str, found: _Found) -> None:
    ids: Set[str] = set()
    candidates = [(m, _sysfs_for(m)) for m in sorted(_mounts(root), key=lambda m: m.point)]
    # Where each block device is visibly mounted whole (root "/"): its other mounts are binds,
    # left to the fstab. A device mounted only partly (a btrfs subvolume, a bind of a
    # subdirectory) is not: ignoring it would recreate its partition empty.
    whole = {}  # type: Dict[str, str]
    for m, sysdir in candidates:
        if sysdir is not None and m.root == "/" and m.hidden_by is None:
            whole.setdefault(os.path.basename(sysdir), _relative(m.point, root))
    for m, sysdir in candidates:
        rel = _relative(m.point, root)
        if m.hidden_by is not None:
            if sysdir is not None:  # off a disk, nothing would be migrated from it anyway
                hider = _relative(m.hidden_by, root) if _under(m.hidden_by, root) else m.hidden_by
                _hidden(rel, m.fstype, os.path.basename(sysdir), hider, whole, found)
            continue
        if sysdir is None:
            if m.fstype in LAYERED_FS and rel != "/":
                found.ignored.append({"mount": rel, "fs": m.fstype, "reason": "container layers"})
            elif m.fstype in UNSUPPORTED_NONBLOCK_FS or rel == "/":
                found.unsupported.append(
                    f"{rel} is {m.fstype} from {m.source}, not a filesystem on a disk partition; rehost migrates "
                    "ext2/3/4, xfs and vfat on plain partitions"
                )
            elif m.fstype in NETWORK_FS or m.fstype.startswith("fuse."):
                found.ignored.append({"mount": rel, "fs": m.fstype, "reason": "network filesystem"})
            continue
        name = os.path.basename(sysdir)
        if m.fstype in IGNORED_BLOCK_FS:
            found.ignored.append({"mount": rel, "fs": m.fstype, "reason": "read-only image"})
            continue
        if whole.get(name, rel) != rel:
            found.ignored.append(
                {"mount": rel, "fs": m.fstype, "reason": "bind mount of " + whole[name]}
            )
            continue
        if os.path.isdir(os.path.join(sysdir, "dm")) or os.path.isdir(os.path.join(sysdir, "md")):
            kind = (
                "device-mapper (LVM, dm-crypt or multipath)"
                if name.startswith("dm-")
                else "md RAID"
            )
            found.unsupported.append(f"{rel} is on /dev/{name}, {kind}, which is not supported")
            continue
        if not os.path.exists(os.path.join(sysdir, "partition")):
            found.unsupported.append(
                f"{rel} is on the whole disk /dev/{name} without a partition table, which is not supported"
            )
            continue
        disk = os.path.basename(os.path.dirname(sysdir))
        device = _node(name, m.source)
        probe = _blkid(device)
        fstype = probe.get("TYPE") if m.fstype == "fuseblk" else m.fstype
        fstype = "vfat" if fstype in ("msdos", "fat") else fstype
        if fstype not in SUPPORTED_FS:
            found.unsupported.append(
                f"{rel} is {fstype} on /dev/{name}; supported filesystems are ext2, ext3, ext4, xfs and vfat"
            )
            continue
        if m.root != "/":
            found.unsupported.append(
                f"only a subdirectory ({m.root}) of /dev/{name} is mounted at {rel}; mount the "
                f"whole filesystem (for example at /mnt/{name}) or leave it out"
            )
            continue
        fs_id = fs_id_for(rel)
        while fs_id in ids:
            fs_id += "-2"
        ids.add(fs_id)
        path = host_path(m.point)
        vfs = os.statvfs(path)
        entry = {
            "mount": rel,
            "path": path,
            "fs_id": fs_id,
            "device": "/dev/" + name,
            "disk": "/dev/" + disk,
            "number": int(_read(os.path.join(sysdir, "partition"))),
            "fs": fstype,
            "uuid": probe.get("UUID", ""),
            "label": probe.get("LABEL", ""),
            "used": (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
            "size": vfs.f_blocks * vfs.f_frsize,
        }  # type: Json
        if fstype == "xfs":
            entry["options"] = _xfs_options(path)
        elif fstype.startswith("ext"):
            entry["options"] = _ext_options(device)
        elif probe.get("VERSION"):
            entry["options"] = {"fat": probe["VERSION"].replace("FAT", "")}
        found.mounts.append(entry)
        if disk not in found.disks:
            if rel == "/":
                found.disks.insert(0, disk)
            else:
                found.disks.append(disk)
    if not any(m["mount"] == "/" for m in found.mounts) and not any(
        r.startswith("/ ") for r in found.unsupported
    ):
        found.unsupported.append("no filesystem on a disk partition is mounted at " + root)


def _hidden(
    rel: str, fstype: str, name: str, hider: str, whole: Dict[str, str], found: _Found
) -> None:
    """Report a mount of /dev/name that a later one hides: its files cannot be read, so it is
    never walked; a FAIL unless the device is also mounted where it can be read."""
    if name in whole or fstype in IGNORED_BLOCK_FS:
        reason = f"hidden by the mount at {hider}"
        found.ignored.append({"mount": rel, "fs": fstype, "reason": reason})
        return
    found.unsupported.append(
        f"{rel} (/dev/{name}) is hidden by the mount at {hider}, so its files cannot be read; "
        f"unmount both, then mount {hider} first and {rel} after it (or leave {rel} out)"
    )


def active_swaps(proc_swaps: str = "/proc/swaps") -> List[Tuple[str, str, int]]:
    """(wire-form path, "file" or "partition", bytes) of each active swap; none if unreadable."""
    swaps = []
    try:
        for line in _proc_lines(proc_swaps)[1:]:
            fields = line.split()
            swaps.append((_unescape(fields[0]), fields[1], int(fields[2]) * 1024))
    except OSError:
        pass
    return swaps


def _disk_layout(disk: str, mounts: List[Json], swap: List[Json], found: _Found) -> Optional[Json]:
    dev = _node(disk)
    # the fallback reads in the disk's own sectors: 4096 bytes on 4Kn disks
    table = _sfdisk_table(dev) or parse_table(
        dev, int(_read(f"/sys/class/block/{disk}/queue/logical_block_size"))
    )
    if table is None or table.get("label") not in ("gpt", "dos"):
        found.unsupported.append(f"/dev/{disk} has no GPT or MBR partition table")
        return None
    unit = int(table.get("sectorsize", 512))
    by_number = {m["number"]: m for m in mounts if m["disk"] == "/dev/" + disk}
    parts = []
    for p in table.get("partitions", []):
        number = _number(p["node"])
        kind = str(p["type"])
        size = int(p["size"]) * unit
        part = {
            "number": number,
            "start": int(p["start"]) * unit // 512,
            "size": size,
            "type": kind,
            "fs": None,
            "uuid": "",
            "label": "",
            "fs_id": None,
            "mount": None,
            "used": size,
            "flags": _flags(table["label"], p),
        }  # type: Json
        for key in ("uuid", "name", "attrs"):
            if p.get(key):
                part["part" + key if key == "uuid" else key] = p[key]
        m = by_number.get(number)
        if m is not None:
            part.update(
                fs=m["fs"],
                uuid=m["uuid"],
                label=m["label"],
                fs_id=m["fs_id"],
                mount=m["mount"],
                used=m["used"],
                options=m.get("options", {}),
            )
        elif table["label"] == "dos" and kind.lower() in DOS_EXTENDED:
            part["used"] = 0
        else:
            probe = _blkid(_node(os.path.basename(p["node"]), p["node"]))
            if probe.get("TYPE") == "swap":
                part.update(
                    fs="swap", uuid=probe.get("UUID", ""), label=probe.get("LABEL", ""), used=0
                )
                swap.append(
                    {
                        "device": "/dev/" + os.path.basename(p["node"]),
                        "uuid": part["uuid"],
                        "label": part["label"],
                        "size": size,
                    }
                )
            elif probe.get("TYPE"):
                fstype = "vfat" if probe["TYPE"] in ("msdos", "fat") else probe["TYPE"]
                if fstype in SUPPORTED_FS:
                    # Kept by UUID (an fstab noauto ESP, say), but there is nothing to copy.
                    part.update(fs=fstype, uuid=probe.get("UUID", ""), label=probe.get("LABEL", ""))
                found.ignored.append(
                    {
                        "mount": None,
                        "fs": fstype,
                        "reason": "partition {} is not mounted: it is recreated empty".format(
                            p["node"]
                        ),
                    }
                )
        parts.append(part)
    return {
        "label": table["label"],
        "label_id": table.get("id", ""),
        "source_size": int(_read(f"/sys/class/block/{disk}/size")) * 512,
        "partitions": parts,
    }


_ADDRESS = re.compile(r"^\d+:\s+(\S+)\s+inet6?\s+(\S+)\s.*\bscope global\b")


def addresses() -> List[str]:
    """This server's global addresses ("192.0.2.10/24"), from `ip -o addr`; none without it.

    Why: the receiver cannot see them, and the network fixup must know them to make sure no
    configuration the destination boots with still sets them (the public IP does not move).
    """
    status, out = _run(["ip", "-o", "addr", "show"])
    found = []  # type: List[str]
    for line in out.splitlines() if status == 0 else []:
        m = _ADDRESS.match(line)
        if m and m.group(1) != "lo" and m.group(2) not in found:
            found.append(m.group(2))
    return found


def discover(source_root: str = "/") -> Json:
    """The layout of the disks behind the filesystems mounted at and below source_root."""
    root = path_to_wire(os.fsencode(os.path.realpath(source_root)))
    found = _Found()
    _collect_mounts(root, found)
    swap = []  # type: List[Json]
    disks = {}  # type: Json
    for index, disk in enumerate(found.disks):
        layout = _disk_layout(disk, found.mounts, swap, found)
        if layout is not None:
            disks[str(index)] = layout
            for m in found.mounts:
                if m["disk"] == "/dev/" + disk:
                    m["disk_index"] = str(index)
    for name, kind, size in active_swaps():
        if kind == "file" and _under(name, root):
            swap.append({"file": _relative(name, root), "size": size})
    first = disks.get("0")
    return {
        "label": first["label"] if first else None,
        "disks": disks,
        "mounts": found.mounts,
        "swap": swap,
        "addresses": addresses(),
        "ignored": found.ignored,
        "unsupported": found.unsupported,
    }
