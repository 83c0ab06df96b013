"""A cached bootable Debian bookworm disk image, the source system of the boot tests (issue 5).

The image is a raw disk with an MBR and one bootable ext4 root partition, made from a cached
debootstrap tree (tests/rootfs.py) with:

- a **static** IPv4 address (`SOURCE_IP`) on the first Ethernet NIC (ifupdown's `/e*/1`
  pattern, since QEMU's virtio-net name depends on its PCI slot);
- a systemd unit that writes `REHOST-BOOT-OK <hostname> <ipv4>` to /dev/ttyS0 once
  network-online.target is reached;
- grub on the serial console (NOTES.md: the default gfxterm prints nothing without a display),
  installed with `grub-install --target=i386-pc` from a chroot of the loop-mounted image.

grub-mkconfig writes `root=/dev/loopNpM` here (no udev, so no /dev/disk/by-uuid); the builder
rewrites that to `root=UUID=<root fs>` so the untouched source boots.

The finished image is cached next to the debootstrap trees and keyed by a hash of the whole
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
from pathlib import Path

import pytest

import rootfs
from loopdisk import ESP, LINUX, LoopLab, Part, blkid

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
SIZE_MIB = 2048
IMAGE_VERSION = 1  # bump to force a rebuild of the image

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

UNIT = f"""\
[Unit]
Description=rehost boot marker on the serial console
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'sleep 2; echo {MARKER} $(hostname) $(ip -4 -o addr show scope global \
| awk "{{print \\$4}}" | cut -d/ -f1 | head -1) > /dev/ttyS0'

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


def _recipe_key(firmware: str) -> str:
    h = hashlib.sha256()
    h.update(rootfs.recipe_key(SUITE, include(firmware)).encode())
    h.update(str((IMAGE_VERSION, SIZE_MIB, HOSTNAME)).encode())
    h.update(Path(__file__).read_bytes())  # the build steps are part of the recipe
    return h.hexdigest()[:16]


def _run(*argv: str | os.PathLike[str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def vfat_mountable() -> bool:
    filesystems = Path("/proc/filesystems").read_text().split()
    return "vfat" in filesystems


def source_image(firmware: str = "bios") -> Path:
    """The cached bootable source disk image (raw) for `firmware`; built on first use.

    BIOS: MBR, one bootable ext4 root, grub-pc in the MBR gap. UEFI: GPT, a 64 MiB ESP at
    /boot/efi and an ext4 root, grub-efi-amd64 installed `--removable` (EFI/BOOT/BOOTX64.EFI,
    no NVRAM entry needed).

    Skips the calling test when debootstrap or the mirror is unavailable (via rootfs).
    """
    for tool in ("sfdisk", "mkfs.ext4", "mkfs.vfat", "losetup", "partx"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if firmware == "uefi" and not vfat_mountable():
        pytest.skip(
            "this kernel cannot mount vfat (not in /proc/filesystems, no modules to load): "
            "neither the UEFI source's ESP nor its migration (agent, receiver and import all "
            "mount the ESP) can be built on this machine"
        )
    tree = rootfs.debian_root(SUITE, include(firmware))
    base = rootfs.cache_dir()
    name = f"{SUITE}-boot-{firmware}-{_recipe_key(firmware)}"
    image = base / f"{name}.img"
    done = base / f"{name}.done"
    if done.exists():
        return image
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return image
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=base))
        try:
            built = _build(tree, scratch, firmware)
            built.rename(image)
            done.write_text(f"{image}\n")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return image


def _build(tree: Path, scratch: Path, firmware: str) -> Path:
    lab = LoopLab(scratch)
    mnt = scratch / "mnt"
    binds: list[Path] = []
    try:
        esp = ""
        if firmware == "uefi":
            parts = [
                Part(64, ESP, "vfat", "/boot/efi", label="ESP"),
                Part(None, LINUX, "ext4", "/", label="rehost-root"),
            ]
            disk = lab.disk("disk", SIZE_MIB, "gpt", parts)
            part = disk.parts[2]
            esp = blkid(disk.parts[1], "UUID")
        else:
            parts = [Part(None, "83", "ext4", "/", label="rehost-root", extra="bootable")]
            disk = lab.disk("disk", SIZE_MIB, "dos", parts)
            part = disk.parts[1]
        uuid = blkid(part, "UUID")
        assert uuid, part
        lab.mount(part, mnt)
        _run("cp", "-a", f"{tree}/.", mnt)
        _configure(mnt, uuid, esp)
        if esp:
            lab.mount(disk.parts[1], mnt / "boot/efi")
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
        fixed = re.sub(r"root=/dev/\S+", f"root=UUID={uuid}", text)
        assert f"root=UUID={uuid}" in fixed, text
        cfg.write_text(fixed)
    finally:
        for where in reversed(binds):
            subprocess.run(["umount", "-l", where], capture_output=True)
        lab.close()
    return disk.image


def _configure(mnt: Path, uuid: str, esp: str) -> None:
    (mnt / "etc/hostname").write_text(HOSTNAME + "\n")
    (mnt / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    fstab = f"UUID={uuid} / ext4 errors=remount-ro 0 1\n"
    if esp:
        fstab += f"UUID={esp} /boot/efi vfat umask=0077 0 1\n"
    (mnt / "etc/fstab").write_text(fstab)
    (mnt / "boot/efi").mkdir(parents=True, exist_ok=True)
    (mnt / "etc/network/interfaces").write_text(INTERFACES)
    unit = mnt / "etc/systemd/system/rehost-boot-ok.service"
    unit.write_text(UNIT)
    wants = mnt / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to("/etc/systemd/system/rehost-boot-ok.service")
    (mnt / "etc/default/grub").write_text(GRUB_DEFAULTS)
    # a root password-less console is handy when debugging a boot by hand
    _run("chroot", mnt, "passwd", "-d", "root")


if __name__ == "__main__":  # `python tests/bootimage.py` pre-builds the cache
    print(source_image("bios"))
    print(source_image("uefi"))
