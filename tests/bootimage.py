"""Cached bootable Debian bookworm disk images, the source systems of the boot tests (issue 5).

Two layouts, each made from a cached debootstrap tree (tests/rootfs.py):

- "simple": one raw disk, MBR with one bootable ext4 root partition (UEFI: GPT, an ESP and
  the root);
- "full" (BIOS): a GPT system disk with a BIOS boot partition, a separate /boot (ext4), a swap
  partition and the root (ext4), plus a data disk (GPT, one ext4 at /data). fstab names /,
  /boot, the swap and /data by UUID, and initramfs-tools resumes from the swap by UUID.

Both have:

- a **static** IPv4 address (`SOURCE_IP`) on the first Ethernet NIC (ifupdown's `/e*/1`
  pattern, since QEMU's virtio-net name depends on its PCI slot);
- a systemd unit that, once network-online.target is reached, writes to /dev/ttyS0 what is
  mounted (`REHOST-MOUNTS boot=DEV:FSTYPE:UUID data=DEV:FSTYPE:UUID swap=DEV:UUID`, empty
  where nothing is) and then `REHOST-BOOT-OK <hostname> <ipv4>`;
- grub on the serial console (NOTES.md: the default gfxterm prints nothing without a display),
  installed with `grub-install --target=i386-pc` from a chroot of the loop-mounted image.

grub-mkconfig writes `root=/dev/loopNpM` here (no udev, so no /dev/disk/by-uuid); the builder
rewrites that to `root=UUID=<root fs>` so the untouched source boots.

The finished images are cached next to the debootstrap trees and keyed by a hash of the whole
recipe (this file's build steps included), built once under a file lock. Tests must boot a
copy-on-write overlay (`overlay`), never the cached image itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import rootfs
from loopdisk import BIOS_BOOT, ESP, LINUX, SWAP, LoopLab, Part, blkid, kernel_has

SUITE = "bookworm"
INCLUDE = (
    "linux-image-cloud-amd64",
    "grub-pc",  # replaced by grub-efi-amd64 for the UEFI image
    "systemd-sysv",
    "udev",
    "initramfs-tools",
    "ifupdown",
    "iproute2",
    # ifupdown only Recommends a DHCP client, which debootstrap does not install; a real
    # Debian server has one, and the DHCP configuration the fixups write needs it
    "isc-dhcp-client",
)
HOSTNAME = "rehost-src"
SOURCE_IP = "192.0.2.10"
DHCP_IP = "10.0.2.15"  # what QEMU's user-mode network hands out
MARKER = "REHOST-BOOT-OK"
MOUNTS_MARKER = "REHOST-MOUNTS"
SIZE_MIB = 2048
DATA_SIZE_MIB = 256
DATA_FILE = "rehost-data.txt"  # on the data disk, so that its content is checked too
IMAGE_VERSION = 2  # bump to force a rebuild of the images

INTERFACES = f"""\
# The loopback network interface
auto lo
iface lo inet loopback

# The first Ethernet NIC, whatever its name (ifupdown >= 0.8 pattern)
auto /e*/1=eth0
iface eth0 inet static
    address {SOURCE_IP}/24
    gateway 192.0.2.1
"""

SCRIPT = f"""\
#!/bin/sh
# issue 5's boot markers: what is mounted, then the hostname and the address
sleep 2
mnt() {{ findmnt -n -o SOURCE,FSTYPE,UUID --mountpoint "$1" | awk '{{print $1 ":" $2 ":" $3}}'; }}
swaps=$(swapon --show=NAME,UUID --noheadings | awk '{{print $1 ":" $2}}' | paste -sd, -)
echo "{MOUNTS_MARKER} boot=$(mnt /boot) data=$(mnt /data) swap=$swaps" > /dev/ttyS0
ip=$(ip -4 -o addr show scope global | awk '{{print $4}}' | cut -d/ -f1 | head -1)
echo "{MARKER} $(hostname) $ip" > /dev/ttyS0
"""

UNIT = """\
[Unit]
Description=rehost boot marker on the serial console
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/rehost-boot-ok

[Install]
WantedBy=multi-user.target
"""

GRUB_DEFAULTS = """\
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""


def include(firmware: str) -> tuple[str, ...]:
    if firmware == "uefi":
        return tuple("grub-efi-amd64" if p == "grub-pc" else p for p in INCLUDE)
    return INCLUDE


def _recipe_key(firmware: str, layout: str) -> str:
    h = hashlib.sha256()
    h.update(rootfs.recipe_key(SUITE, include(firmware)).encode())
    h.update(str((IMAGE_VERSION, SIZE_MIB, DATA_SIZE_MIB, HOSTNAME, layout)).encode())
    h.update(Path(__file__).read_bytes())  # the build steps are part of the recipe
    return h.hexdigest()[:16]


def _run(*argv: str | os.PathLike[str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


NO_KERNEL_VFAT = (
    "this kernel has no vfat driver, and the migration writes the destination's ESP with the "
    "kernel's (receiver, import --fixup, grub-install): fusefat 0.1a, Debian's only FUSE FAT "
    "driver, creates files but cannot overwrite or truncate them (EPERM on write; O_TRUNC "
    "keeps the old size) and left both FATs corrupt in a trial, so grub-install --removable "
    "over the migrated EFI/BOOT/BOOTX64.EFI fails with 'Operation not permitted'"
)


def require_kernel_vfat() -> None:
    """Skip a UEFI migration case on a kernel without vfat (see NO_KERNEL_VFAT)."""
    if not kernel_has("vfat"):
        pytest.skip(NO_KERNEL_VFAT)


def vfat_mountable() -> bool:
    """vfat mounts here: with the kernel's driver, or with fusefat (rehost.disk.mount)."""
    return kernel_has("vfat") or shutil.which("fusefat") is not None


@dataclass(frozen=True)
class SourceDisks:
    """A cached source system: its raw disk images, system disk first."""

    system: Path
    data: Path | None = None

    @property
    def all(self) -> list[Path]:
        return [self.system, *([self.data] if self.data else [])]


def source_image(firmware: str = "bios") -> Path:
    """The cached "simple" source disk image (raw) for `firmware`; built on first use."""
    return source_disks(firmware, "simple").system


def source_disks(firmware: str = "bios", layout: str = "simple") -> SourceDisks:
    """The cached bootable source disks for `firmware` and `layout`; built on first use.

    BIOS simple: MBR, one bootable ext4 root, grub-pc in the MBR gap. BIOS full: GPT with a
    BIOS boot partition, /boot, swap and /, grub-pc in the BIOS boot partition, and a data
    disk. UEFI simple: GPT, a 64 MiB ESP at /boot/efi and an ext4 root, grub-efi-amd64
    installed `--removable` (EFI/BOOT/BOOTX64.EFI, no NVRAM entry needed).

    Skips the calling test when debootstrap or the mirror is unavailable (via rootfs).
    """
    assert (firmware, layout) in (("bios", "simple"), ("bios", "full"), ("uefi", "simple"))
    for tool in ("sfdisk", "mkfs.ext4", "mkfs.vfat", "mkswap", "losetup", "partx"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if firmware == "uefi" and not vfat_mountable():
        pytest.skip(
            "this kernel cannot mount vfat and fusefat is not installed (apt-get install "
            "fusefat): neither the UEFI source's ESP nor its migration can be built here"
        )
    tree = rootfs.debian_root(SUITE, include(firmware))
    base = rootfs.cache_dir()
    name = f"{SUITE}-boot-{firmware}-{layout}-{_recipe_key(firmware, layout)}"
    disks = SourceDisks(
        base / f"{name}.img", base / f"{name}.data.img" if layout == "full" else None
    )
    done = base / f"{name}.done"
    if done.exists():
        return disks
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return disks
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=base))
        try:
            built = _build(tree, scratch, firmware, layout)
            for image, target in zip(built, disks.all, strict=True):
                image.rename(target)
            done.write_text("".join(f"{p}\n" for p in disks.all))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return disks


def _build(tree: Path, scratch: Path, firmware: str, layout: str) -> list[Path]:
    lab = LoopLab(scratch)
    mnt = scratch / "mnt"
    binds: list[Path] = []
    try:
        data = None
        if firmware == "uefi":
            parts = [
                Part(64, ESP, "vfat", "/boot/efi", label="ESP"),
                Part(None, LINUX, "ext4", "/", label="rehost-root"),
            ]
            disk = lab.disk("disk", SIZE_MIB, "gpt", parts)
            numbers = {"/": 2, "/boot/efi": 1}
        elif layout == "full":
            parts = [
                Part(1, BIOS_BOOT),
                Part(256, LINUX, "ext4", "/boot", label="boot"),
                Part(128, SWAP, "swap", label="swap0"),
                Part(None, LINUX, "ext4", "/", label="rehost-root"),
            ]
            disk = lab.disk("disk", SIZE_MIB, "gpt", parts)
            numbers = {"/": 4, "/boot": 2, "swap": 3}
            data = lab.disk(
                "data", DATA_SIZE_MIB, "gpt", [Part(None, LINUX, "ext4", "/data", label="data")]
            )
        else:
            parts = [Part(None, "83", "ext4", "/", label="rehost-root", extra="bootable")]
            disk = lab.disk("disk", SIZE_MIB, "dos", parts)
            numbers = {"/": 1}
        devs = {mount: disk.parts[n] for mount, n in numbers.items()}
        if data is not None:
            devs["/data"] = data.parts[1]
        uuids = {mount: blkid(dev, "UUID") for mount, dev in devs.items()}
        assert all(uuids.values()), uuids
        lab.mount(devs["/"], mnt)
        for mount in ("/boot", "/data"):  # the tree's /boot lands on its own filesystem
            if mount in devs:
                lab.mount(devs[mount], mnt / mount.lstrip("/"))
        _run("cp", "-a", f"{tree}/.", mnt)
        _configure(mnt, uuids)
        if "/boot/efi" in devs:
            lab.mount(devs["/boot/efi"], mnt / "boot/efi")
        for sub in ("dev", "proc", "sys"):
            _run("mount", "--bind", f"/{sub}", mnt / sub)
            binds.append(mnt / sub)
        if firmware == "uefi":
            _run("chroot", mnt, "grub-install", "--target=x86_64-efi", "--efi-directory=/boot/efi",
                 "--removable", "--no-nvram")  # fmt: skip
        else:
            _run("chroot", mnt, "grub-install", "--target=i386-pc", disk.dev)
        _run("chroot", mnt, "update-grub")
        cfg = mnt / "boot/grub/grub.cfg"
        text = cfg.read_text()
        fixed = re.sub(r"root=/dev/\S+", f"root=UUID={uuids['/']}", text)
        assert f"root=UUID={uuids['/']}" in fixed, text
        cfg.write_text(fixed)
        if "/boot/efi" in devs:  # written through fusefat where the kernel has no vfat
            _run("umount", mnt / "boot/efi")
            lab.mounts.remove(mnt / "boot/efi")
            _run("fsck.vfat", "-n", devs["/boot/efi"])
    finally:
        for where in reversed(binds):
            subprocess.run(["umount", "-l", where], capture_output=True)
        lab.close()
    return [disk.image, *([data.image] if data else [])]


FSTAB_LINES = {
    "/": "UUID={} / ext4 errors=remount-ro 0 1\n",
    "/boot": "UUID={} /boot ext4 defaults 0 2\n",
    "/boot/efi": "UUID={} /boot/efi vfat umask=0077 0 1\n",
    "swap": "UUID={} none swap sw 0 0\n",
    "/data": "UUID={} /data ext4 defaults 0 2\n",
}


def _configure(mnt: Path, uuids: dict[str, str]) -> None:
    (mnt / "etc/hostname").write_text(HOSTNAME + "\n")
    (mnt / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    fstab = "".join(line.format(uuids[m]) for m, line in FSTAB_LINES.items() if m in uuids)
    (mnt / "etc/fstab").write_text(fstab)
    if "swap" in uuids:
        (mnt / "etc/initramfs-tools/conf.d/resume").write_text(f"RESUME=UUID={uuids['swap']}\n")
    if "/data" in uuids:
        (mnt / "data" / DATA_FILE).write_text(f"the data disk of {HOSTNAME}\n")
    (mnt / "boot/efi").mkdir(parents=True, exist_ok=True)
    (mnt / "etc/network/interfaces").write_text(INTERFACES)
    script = mnt / "usr/local/sbin/rehost-boot-ok"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    unit = mnt / "etc/systemd/system/rehost-boot-ok.service"
    unit.write_text(UNIT)
    wants = mnt / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to("/etc/systemd/system/rehost-boot-ok.service")
    (mnt / "etc/default/grub").write_text(GRUB_DEFAULTS)
    # a root password-less console is handy when debugging a boot by hand
    _run("chroot", mnt, "passwd", "-d", "root")


if __name__ == "__main__":  # `python tests/bootimage.py` pre-builds the cache
    print(source_disks("bios", "simple"))
    print(source_disks("bios", "full"))
    print(source_disks("uefi", "simple"))
