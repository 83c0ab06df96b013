"""Loop-device disks with real partition tables and filesystems, mounted like a source server.

This machine has no udev and a kernel without partition-table parsers: after sfdisk, `partx`
tells the kernel about the partitions and we mknod the /dev nodes ourselves. Everything made
here is recorded on a `LoopLab` and undone in reverse order by `close()`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"


def sh(*args: str | os.PathLike[str], check: bool = True) -> str:
    proc = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


@dataclass
class Part:
    """One partition: size (None takes the rest), type, and what to put on it."""

    size_mib: int | None
    type: str
    fs: str | None = None
    mount: str | None = None
    label: str = ""
    extra: str = ""  # more sfdisk fields, e.g. "bootable"
    fill_mib: int = 0  # incompressible data written after mounting


@dataclass
class LoopDisk:
    image: Path
    dev: str
    parts: dict[int, str] = field(default_factory=dict)  # number -> /dev node


def blkid(dev: str, tag: str) -> str:
    return sh("blkid", "-p", "-o", "value", "-s", tag, dev, check=False).strip()


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


@dataclass
class MountNamespace:
    """A private mount namespace, held by a sleeping process."""

    pid: int

    def cmd(self, *args: str | os.PathLike[str]) -> list[str]:
        """The argv that runs `args` in this namespace: for tools that cannot read through
        path() (rsync 3.5's receiver resolves its destination to a path in its own namespace)."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", *[os.fspath(a) for a in args]]

    def mount(self, *args: str | os.PathLike[str]) -> None:
        sh(*self.cmd("mount", *args))

    def path(self, where: Path) -> Path:
        """`where` as this namespace sees it, read from ours."""
        return Path(f"/proc/{self.pid}/root") / str(where).lstrip("/")


@contextlib.contextmanager
def mount_namespace() -> Iterator[MountNamespace]:
    """Mount here what must not outlive the test in other namespaces.

    This host's / is private, so a mount in ours is copied into every namespace that an
    `unshare` or `ip netns exec` makes meanwhile (the other xdist worker's agents, receivers
    and rescue VM), and our umount reaches those copies only where conftest's shared temporary
    directory and a slave namespace meet. A read-only copy that lives on makes a later
    read-write mount of the device fail with EBUSY ("already mounted or mount point busy"): CI
    saw it. A mount made in this namespace has no copies, and killing the holder drops it.
    The namespace is a slave, so that our umounts reach the copies of ours that it holds."""
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "infinity"])
    try:
        ours, deadline = os.readlink("/proc/self/ns/mnt"), time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == ours:  # until unshare has run
            assert holder.poll() is None and time.monotonic() < deadline, "unshare failed"
            time.sleep(0.01)
        yield MountNamespace(holder.pid)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def kernel_has(fs: str) -> bool:
    """Whether the running kernel can mount `fs` (listed in /proc/filesystems)."""
    return fs in Path("/proc/filesystems").read_text().split()


def part_sysfs(disk: str, number: int) -> str | None:
    """The kernel name of partition `number` of `disk`, if the kernel knows it."""
    base = Path("/sys/class/block") / Path(disk).name
    for child in base.iterdir():
        pfile = child / "partition"
        if pfile.exists() and int(pfile.read_text()) == number:
            return child.name
    return None


class LoopLab:
    """Creates loop disks, partitions, filesystems and mounts; close() undoes all of it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loops: list[str] = []
        self.nodes: list[Path] = []
        self.mounts: list[Path] = []
        self.fuse: list[subprocess.Popen[bytes]] = []

    def disk(self, name: str, size_mib: int, label: str = "", parts: list[Part] = ()) -> LoopDisk:  # type: ignore[assignment]
        image = self.directory / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * MiB)
        dev = sh("losetup", "-fP", "--show", image).strip()
        self.loops.append(dev)
        disk = LoopDisk(image, dev)
        if not parts:
            return disk
        lines = [f"label: {label}"]
        for p in parts:
            fields = ["" if p.size_mib is None else f"size={p.size_mib}MiB", f"type={p.type}"]
            lines.append(", ".join(f for f in [*fields, p.extra] if f))
        subprocess.run(
            ["sfdisk", "-q", "--wipe", "always", dev],
            input="\n".join(lines) + "\n",
            text=True,
            check=True,
            capture_output=True,
        )
        self.sync_partitions(disk)
        numbers = sorted(disk.parts)
        for number, p in zip(numbers, [p for p in parts if p.type not in ("5", "f")], strict=True):
            self.mkfs(disk.parts[number], p.fs, p.label)
        return disk

    def sync_partitions(self, disk: LoopDisk) -> None:
        """Make the kernel and /dev agree with the partition table on the disk."""
        sh("partx", "-u", disk.dev, check=False)
        table = sh("partx", "-g", "-o", "NR", disk.dev, check=False).split()
        for number in map(int, table):
            if part_sysfs(disk.dev, number) is None:
                sh("partx", "-a", "-n", f"{number}:{number}", disk.dev)
            name = part_sysfs(disk.dev, number)
            assert name is not None
            node = Path("/dev") / name
            major, minor = (Path("/sys/class/block") / name / "dev").read_text().split(":")
            rdev = os.makedev(int(major), int(minor))
            if node.exists() and node.stat().st_rdev != rdev:
                node.unlink()
            if not node.exists():
                os.mknod(node, 0o600 | 0o060000, rdev)
                self.nodes.append(node)
            if int((Path("/sys/class/block") / name / "size").read_text()) > 2:
                disk.parts[number] = str(node)

    def mkfs(self, dev: str, fs: str | None, label: str) -> None:
        lab = ["-L", label] if label else []
        if fs in ("ext2", "ext3", "ext4"):
            sh(f"mkfs.{fs}", "-q", "-F", *lab, dev)
        elif fs == "xfs":
            sh("mkfs.xfs", "-q", "-f", *lab, dev)
        elif fs == "vfat":
            sh("mkfs.vfat", *(["-n", label] if label else []), dev)
        elif fs == "swap":
            sh("mkswap", *lab, dev)
        elif fs == "btrfs":
            sh("mkfs.btrfs", "-q", "-f", *lab, dev)

    def mount(self, dev: str, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        if blkid(dev, "TYPE") == "vfat" and not kernel_has("vfat"):
            self._fusefat(dev, where)
        else:
            sh("mount", dev, where)
        self.mounts.append(where)

    def _fusefat(self, dev: str, where: Path) -> None:
        """vfat through FUSE on a kernel without it (test fixtures only: fusefat 0.1a creates
        files reliably, but cannot overwrite or truncate them; see docs/fixups.md).

        A block-device mount (fuseblk): mountinfo shows DEV and its device number like a kernel
        mount, and umount waits until the FAT is written back. Run in the foreground, so that
        close() can reap it by PID."""
        proc = subprocess.Popen(
            ["fusefat", "-f", "-o", f"rw+,blkdev,fsname={dev}", dev, str(where)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.fuse.append(proc)
        deadline = time.monotonic() + 30
        while not any(ln.split()[4] == str(where) for ln in _mountinfo()):
            assert proc.poll() is None, f"fusefat {dev} {where} exited {proc.returncode}"
            assert time.monotonic() < deadline, f"fusefat {dev} {where} did not mount"
            time.sleep(0.05)

    def mount_tree(self, root: Path, disks: list[tuple[LoopDisk, list[Part]]]) -> None:
        """Mount every partition with a mount point under root, shallowest first, then fill."""
        todo = []
        for disk, parts in disks:
            real = [p for p in parts if p.type not in ("5", "f")]
            for number, p in zip(sorted(disk.parts), real, strict=True):
                if p.mount:
                    todo.append((p.mount, disk.parts[number], p.fill_mib))
        for mount, dev, _ in sorted(todo):
            self.mount(dev, root / mount.lstrip("/"))
        for mount, _, fill in todo:
            if fill:
                with open(root / mount.lstrip("/") / "fill.bin", "wb") as f:
                    for _ in range(fill):
                        f.write(os.urandom(MiB))

    def close(self) -> None:
        errors = []
        for where in reversed(self.mounts):
            proc = subprocess.run(["umount", where], capture_output=True, text=True)
            if proc.returncode != 0 and "not mounted" not in proc.stderr:
                errors.append(proc.stderr)
        for daemon in self.fuse:  # unmounted above: they exit by themselves
            try:
                # 30 s was once too short (2026-12-06, a full run with the other worker's
                # QEMU on both cores); the same test passed alone.
                daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)
                errors.append(f"fusefat (pid {daemon.pid}) did not exit after its unmount")
        # the partition nodes go while the loops are still ours: once detached, another test
        # process (a second xdist worker) may attach the same loopN and mknod its own loopNpM
        for node in self.nodes:
            node.unlink(missing_ok=True)
        for dev in self.loops:  # nodes the code under test made for these loops
            for node in Path("/dev").glob(Path(dev).name + "p*"):
                node.unlink(missing_ok=True)
        for dev in reversed(self.loops):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        assert not errors, errors
