"""Recreate the source's disk layout on the destination disks, format and mount it.

The receiver gets the layout the agent discovered (docs/online-protocol.md, "Layout") and makes
the same partition table type, partition types, flags, GPT names and partition UUIDs, and the
same filesystems with the same UUIDs, labels and feature sets, so that the source's fstab,
grub config and kernel still find and mount everything. Partitions keep their size when the
disk allows, shrink (never below the used data plus a margin) when it is smaller, and the
last ext/xfs partition grows to fill a larger disk (an MBR table only as far as its 2^32
sectors reach). The sizing rules live in protocol.py, shared with the agent's precheck.

Rescue systems may lack udev, and this kernel may lack partition-table parsers: after sfdisk
we tell the kernel with partx and create missing /dev nodes from /sys/class/block.

prepare() is idempotent: a second call with the same layout only checks and remounts, so a
re-run resumes; a different layout is refused once data has been written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from rehost.errors import RehostError
from rehost.mountinfo import is_mounted, mounts_of
from rehost.online.protocol import (
    MiB,
    align_down,
    align_up,
    disk_need,
    is_extended,
    is_growable,
    partition_minimum,
    table_overhead,
    usable_bytes,
    valid_fs_id,
)

FORMATS = ("ext2", "ext3", "ext4", "xfs", "vfat", "swap")
EMPTY_FS_ENTRIES = {"lost+found"}
FAT16_MAX_CLUSTERS = 65524

log = logging.getLogger("rehost.receiver")

Json = dict[str, Any]


class DestinationTooSmall(RehostError):
    code = "DESTINATION_TOO_SMALL"
    message = "the destination disk is too small for the used data"
    default_hint = (
        "use a destination disk at least as large as the need, or free space on the source"
    )

    def __init__(self, disk: str, need: int, have: int) -> None:
        self.disk, self.need, self.have = disk, need, have
        super().__init__(f"disk {disk} needs {need} bytes (need), has {have} bytes (have)")

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "need": str(self.need), "have": str(self.have)}


class LayoutUnsupported(RehostError):
    code = "LAYOUT_UNSUPPORTED"
    message = "the source disk layout is not supported"
    default_hint = (
        "rehost migrates GPT or MBR disks with ext2/3/4, xfs, vfat and swap partitions; "
        "convert or leave out the rest (see the agent's --check)"
    )


class LayoutMismatch(RehostError):
    code = "LAYOUT_MISMATCH"
    message = "the destination disks were already prepared for a different layout"
    default_hint = (
        "run the agent with the same source layout, or start over: remove the receiver's "
        "state dir and wipe the destination disks (wipefs -a)"
    )


class DiskPrepareFailed(RehostError):
    code = "DISK_PREPARE_FAILED"
    message = "preparing the destination disks failed"
    default_hint = "check the destination disks and the receiver's log, then run the agent again"


def _run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskPrepareFailed(
            f"`{' '.join(args)}` exited {proc.returncode}: {proc.stdout}{proc.stderr}".strip()
        )
    return proc.stdout


# -- devices ---------------------------------------------------------------------------


def _sysfs(dev: str) -> Path:
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise DiskPrepareFailed(f"{dev} is not a block device")
    return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve()


def disk_size(dev: str) -> tuple[int, int]:
    """Size in bytes and logical sector size of a destination disk."""
    sys = _sysfs(dev)
    return int((sys / "size").read_text()) * 512, int(
        (sys / "queue/logical_block_size").read_text()
    )


def _part_name(disk: str, number: int) -> str | None:
    for child in _sysfs(disk).iterdir():
        pfile = child / "partition"
        if pfile.exists() and int(pfile.read_text()) == number:
            return child.name
    return None


def _part_node(disk: str, number: int) -> str:
    """The /dev node of a partition, telling the kernel about it and creating the node if needed."""
    name = _part_name(disk, number)
    if name is None:
        _run("partx", "-a", "-n", f"{number}:{number}", disk)
        name = _part_name(disk, number)
        if name is None:
            raise DiskPrepareFailed(f"the kernel does not see partition {number} of {disk}")
    major, minor = (Path("/sys/class/block") / name / "dev").read_text().split(":")
    rdev = os.makedev(int(major), int(minor))
    node = Path("/dev") / name
    try:
        if node.stat().st_rdev == rdev:
            return str(node)
        node.unlink()
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):  # udev made it meanwhile
        os.mknod(node, 0o660 | stat.S_IFBLK, rdev)
    return str(node)


def _in_use(disk: str) -> list[str]:
    """Mount points and swaps on the disk or its partitions."""
    sys = _sysfs(disk)
    devnos = {(sys / "dev").read_text().strip()}
    devnos |= {(c / "dev").read_text().strip() for c in sys.iterdir() if (c / "partition").exists()}
    users = mounts_of(devnos)
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        name = line.split()[0]
        try:
            st = os.stat(name)
        except OSError:
            continue
        if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" in devnos:
            users.append(name)
    return users


def _blkid(dev: str) -> dict[str, str]:
    proc = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


# -- planning --------------------------------------------------------------------------


def _canonical(layout: Json) -> Json:
    return {"label": layout.get("label"), "disks": layout.get("disks", {})}


def _check_supported(layout: Json, disks: dict[str, str]) -> None:
    reasons = list(layout.get("unsupported") or [])
    fs_ids: set[str] = set()
    if not layout.get("disks"):
        reasons.append("the layout has no disks")
    for index, disk in sorted(layout.get("disks", {}).items()):
        label = disk.get("label") or layout.get("label")
        if label not in ("gpt", "dos"):
            reasons.append(f"disk {index}: partition table {label!r} (need gpt or dos)")
        if index not in disks:
            reasons.append(
                f"disk {index} of the source has no destination disk (--data-disk {index}=DEV)"
            )
        for p in disk.get("partitions", []):
            if p.get("fs") is not None and p["fs"] not in FORMATS:
                reasons.append(f"disk {index} partition {p['number']}: filesystem {p['fs']}")
            fs_id = p.get("fs_id")
            if fs_id is None:
                continue
            if not valid_fs_id(fs_id) or fs_id in fs_ids:  # (not hashable: not valid)
                reasons.append(f"disk {index} partition {p['number']}: fs_id {fs_id!r}")
            else:
                fs_ids.add(fs_id)
    if reasons:
        raise LayoutUnsupported("; ".join(reasons))


def plan_disk(
    index: str, disk: Json, label: str, have: int, sector: int
) -> list[tuple[Json, int, int]]:
    """(partition, start, size) in bytes for each partition, in on-disk order; fits `have`."""
    parts = sorted(disk.get("partitions", []), key=lambda p: int(p["start"]))
    real = [p for p in parts if not is_extended(label, p)]
    usable = usable_bytes(have, label, sector)
    if usable < align_down(have):
        log.info(
            "disk %s: an MBR table reaches %d of its %d bytes; the rest stays unused",
            index,
            usable,
            have,
        )
    available = usable - table_overhead(label, real)
    sizes = {id(p): int(p["size"]) for p in real}
    if sum(align_up(s) for s in sizes.values()) > available:
        need = disk_need(disk, label)
        if need > usable:
            raise DestinationTooSmall(index, need, have)
        mins = {id(p): partition_minimum(p) for p in real}
        slack = usable - need
        give = {k: sizes[k] - mins[k] for k in sizes}
        total = sum(give.values())
        sizes = {
            k: align_down(mins[k] + slack * give[k] // total) if give[k] else sizes[k]
            for k in sizes
        }
    else:
        growable = [p for p in real if is_growable(p)]
        if growable:
            last = id(growable[-1])
            sizes[last] = align_down(
                sizes[last] + available - sum(align_up(s) for s in sizes.values())
            )
    plan: list[tuple[Json, int, int]] = []
    cursor = MiB
    ext_index = None
    for p in parts:
        if is_extended(label, p):
            ext_index = len(plan)
            plan.append((p, cursor, 0))
            continue
        if ext_index is not None and int(p["number"]) > 4:
            cursor += MiB  # room for the logical partition's EBR
        plan.append((p, cursor, sizes[id(p)]))
        cursor = align_up(cursor + sizes[id(p)])
    if ext_index is not None:
        ext, start, _ = plan[ext_index]
        end = max((s + n for q, s, n in plan if int(q["number"]) > 4), default=start + MiB)
        plan[ext_index] = (ext, start, end - start)
    return plan


def _sfdisk_script(
    dev: str, disk: Json, label: str, plan: list[tuple[Json, int, int]], sector: int
) -> str:
    lines = [f"label: {label}", "unit: sectors"]
    if disk.get("label_id"):
        lines.append(f"label-id: {disk['label_id']}")
    sep = "p" if dev[-1].isdigit() else ""
    for p, start, size in sorted(plan, key=lambda t: int(t[0]["number"])):
        fields = [f"start={start // sector}", f"size={size // sector}", f"type={p['type']}"]
        if label == "gpt":
            if p.get("partuuid"):
                fields.append(f"uuid={p['partuuid']}")
            if p.get("name"):
                fields.append('name="{}"'.format(p["name"].replace('"', "")))
            if p.get("attrs"):
                fields.append(f'attrs="{p["attrs"]}"')
        elif "boot" in p.get("flags", []):
            fields.append("bootable")
        lines.append(f"{dev}{sep}{p['number']} : " + ", ".join(fields))
    return "\n".join(lines) + "\n"


# -- formatting ------------------------------------------------------------------------


def _fat16_cluster_sectors(size: int, sector: int) -> int:
    """Sectors per cluster for FAT16 on `sector`-byte sectors: the fewest that keep the
    cluster count in FAT16's range. mkfs.fat's own choice assumes 512-byte sectors and
    makes too few clusters (and fails) on a small partition with 4 KiB sectors."""
    count = 1
    while size // (count * sector) > FAT16_MAX_CLUSTERS:
        count *= 2
    return count


def _mkfs(dev: str, p: Json, size: int, sector: int) -> None:
    """Format partition `dev` (`size` bytes, `sector`-byte logical sectors) like the source's,
    but for the destination's sectors: mkfs refuses an ext block size below them (a small
    /boot's 1 KiB blocks on a 4 KiB-sector disk), so it is raised to the sector size."""
    fs, uuid, label = p["fs"], p.get("uuid") or "", p.get("label") or ""
    opts = p.get("options") or {}
    if fs in ("ext2", "ext3", "ext4"):
        args = [f"mkfs.{fs}", "-F", "-q"]
        args += ["-U", uuid] if uuid else []
        args += ["-L", label[:16]] if label else []
        if opts.get("block_size"):
            args += ["-b", str(max(int(opts["block_size"]), sector))]
        if opts.get("inode_size"):
            args += ["-I", str(opts["inode_size"])]
        if opts.get("features"):
            args += ["-O", ",".join(["none", *opts["features"]])]
    elif fs == "xfs":
        meta = [f"uuid={uuid}"] if uuid else []
        meta += [
            f"{k}={opts[k]}"
            for k in ("crc", "finobt", "rmapbt", "reflink", "bigtime", "inobtcount")
            if k in opts
        ]
        args = ["mkfs.xfs", "-f", "-q", "-m", ",".join(meta)] if meta else ["mkfs.xfs", "-f", "-q"]
        inode = [f"{k}={opts[k]}" for k in ("sparse", "nrext64") if k in opts]
        args += ["-i", ",".join(inode)] if inode else []
        args += ["-n", f"ftype={opts['ftype']}"] if "ftype" in opts else []
        args += ["-L", label[:12]] if label else []
    elif fs == "vfat":
        args = ["mkfs.vfat"]
        args += ["-i", uuid.replace("-", "")] if uuid else []
        args += ["-n", label[:11]] if label else []
        args += ["-F", str(opts["fat"])] if opts.get("fat") else []
        if str(opts.get("fat")) == "16" and sector > 512:
            args += ["-s", str(_fat16_cluster_sectors(size, sector))]
    else:
        args = ["mkswap", "-f"]
        args += ["-U", uuid] if uuid else []
        args += ["-L", label] if label else []
    _run(*args, dev)


def _mount(dev: str, fs: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if is_mounted(where):
        return
    try:
        # nouuid: xfs refuses a second filesystem with a UUID it has mounted, which is the
        # point of a copy (and how tests run source and destination on one host).
        # nodev, nosuid: the receiver writes what the source sends, device nodes and setuid
        # files included; none of them is for this rescue system to open or run.
        opts = "nodev,nosuid,nouuid" if fs == "xfs" else "nodev,nosuid"
        _run("mount", "-t", fs, "-o", opts, dev, str(where))
    except DiskPrepareFailed as e:
        try:
            rdev = os.stat(dev).st_rdev
        except OSError:
            raise e from None
        elsewhere = mounts_of({f"{os.major(rdev)}:{os.minor(rdev)}"})
        if not elsewhere:
            raise
        raise DiskPrepareFailed(
            f"{e.reason}; {dev} is mounted elsewhere: {', '.join(elsewhere)}",
            hint=f"unmount {dev} there, or end those processes, then run the agent again",
        ) from e


def _fs_parts(layout: Json, disks: dict[str, str]) -> list[tuple[str, int, Json]]:
    """(destination disk, partition number, partition) of every formatted partition."""
    out = []
    for index, disk in sorted(layout["disks"].items()):
        for p in disk.get("partitions", []):
            if p.get("fs") in FORMATS:
                out.append((disks[index], int(p["number"]), p))
    return out


def _result(layout: Json, disks: dict[str, str], state_dir: Path, verify: bool) -> Json:
    filesystems: Json = {}
    swap = []
    for disk, number, p in _fs_parts(layout, disks):
        dev = _part_node(disk, number)
        if verify:
            probe = _blkid(dev)
            want = "vfat" if p["fs"] == "vfat" else p["fs"]
            if probe.get("TYPE") != want or (
                p.get("uuid") and probe.get("UUID", "").lower() != p["uuid"].lower()
            ):
                raise LayoutMismatch(
                    f"{dev} holds {probe.get('TYPE')} {probe.get('UUID')}, expected {want} {p.get('uuid')}"
                )
        if p["fs"] == "swap":
            swap.append({"device": dev, "uuid": p.get("uuid", ""), "label": p.get("label", "")})
            continue
        if not p.get("fs_id"):
            continue  # formatted only: nothing of it is transferred
        where = state_dir / "mnt" / p["fs_id"]
        _mount(dev, p["fs"], where)
        filesystems[p["fs_id"]] = {
            "mounted_at": str(where),
            "device": dev,
            "uuid": p.get("uuid", ""),
        }
    return {"filesystems": filesystems, "swap": swap}


def _untouched(record: Json, state_dir: Path) -> bool:
    """Nothing was written to the filesystems prepared before (only lost+found in them)."""
    for fs in record["result"]["filesystems"].values():
        where = Path(fs["mounted_at"])
        if not is_mounted(where):
            try:
                _mount(fs["device"], _blkid(fs["device"]).get("TYPE", "auto"), where)
            except DiskPrepareFailed:
                continue  # unmountable: nothing of ours in it
        if set(os.listdir(where)) - EMPTY_FS_ENTRIES:
            return False
    return True


def prepare(layout: Json, disks: dict[str, str], state_dir: Path) -> Json:
    """Partition, format and mount the destination disks for the source layout."""
    _check_supported(layout, disks)
    canonical = _canonical(layout)
    record_path = state_dir / "layout.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["layout"] == canonical and record["disks"] == disks:
            result = _result(canonical, disks, state_dir, verify=True)
            return result
        if not _untouched(record, state_dir):
            raise LayoutMismatch("the filesystems already hold transferred data")
        finalize(state_dir)
        record_path.unlink()
    _unmount_leftovers(state_dir)
    # Every disk is planned, and its table tried (sfdisk --no-act), before the first is
    # written: what can fail, fails with all disks as they were.
    scripts = {}
    sizes: dict[tuple[str, int], tuple[int, int]] = {}  # (disk, number) -> (bytes, sector)
    for index, disk in sorted(canonical["disks"].items()):
        dev = disks[index]
        have, sector = disk_size(dev)
        label = disk.get("label") or canonical["label"]
        plan = plan_disk(index, disk, label, have, sector)
        users = _in_use(dev)
        if users:
            raise DiskPrepareFailed(f"{dev} is in use: {', '.join(users)}")
        scripts[dev] = _sfdisk_script(dev, disk, label, plan, sector)
        sizes.update({(dev, int(p["number"])): (size, sector) for p, _, size in plan})
    for dev, script in scripts.items():
        _run("sfdisk", "--no-act", "-q", "--wipe", "always", dev, stdin=script)
    for dev, script in scripts.items():
        _run("sfdisk", "-q", "--wipe", "always", "--wipe-partitions", "always", dev, stdin=script)
        subprocess.run(["partx", "-u", dev], capture_output=True)
    for disk, number, p in _fs_parts(canonical, disks):
        _mkfs(_part_node(disk, number), p, *sizes[disk, number])
    result = _result(canonical, disks, state_dir, verify=False)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"layout": canonical, "disks": disks, "result": result}, indent=1))
    os.replace(tmp, record_path)
    return result


def _unmount_leftovers(state_dir: Path) -> None:
    """Unmount what an interrupted prepare() mounted before it could record it."""
    mnt = state_dir / "mnt"
    for where in sorted(mnt.iterdir(), reverse=True) if mnt.is_dir() else []:
        if is_mounted(where):
            _run("umount", "-R", str(where))


def finalize(state_dir: Path) -> None:
    """Sync and unmount what prepare() mounted, in reverse order; the disks are left clean."""
    os.sync()
    record_path = state_dir / "layout.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        for fs in reversed(list(record["result"]["filesystems"].values())):
            where = Path(fs["mounted_at"])
            if is_mounted(where):
                # -R: binds an interrupted fixup left inside it would keep it busy for good
                _run("umount", "-R", str(where))
    _unmount_leftovers(state_dir)
