"""What each format looks like in its first 64 KiB and last 512 bytes.

Kept apart from the drivers so that detecting a format imports none of them:
a conversion then loads only the driver it needs (the others cost ~20 ms of
start-up, which on a 2 GiB conversion is a few percent).
"""

from __future__ import annotations

from collections.abc import Callable

QCOW2_MAGIC = b"QFI\xfb"
VHD_COOKIE = b"conectix"
VHDX_FILE_ID = b"vhdxfile"
VMDK_MAGIC = b"KDMV"
VMDK_COWD_MAGIC = b"COWD"


def qcow2(head: bytes, tail: bytes) -> bool:
    # Matches qcow version 1 too, so that open() can refuse it by name.
    return head[:4] == QCOW2_MAGIC


def vhd(head: bytes, tail: bytes) -> bool:
    return head[:8] == VHD_COOKIE or tail[-512:-504] == VHD_COOKIE


def vhdx(head: bytes, tail: bytes) -> bool:
    return head[:8] == VHDX_FILE_ID


def vmdk(head: bytes, tail: bytes) -> bool:
    return head[:4] in (VMDK_MAGIC, VMDK_COWD_MAGIC) or is_vmdk_descriptor(head)


def is_vmdk_descriptor(head: bytes) -> bool:
    """qemu's probe: comment and blank lines, then a `version=1|2|3` line."""
    if head.startswith(b"# Disk DescriptorFile"):
        return True
    for raw in head[:2048].split(b"\n")[:-1]:
        line = raw.rstrip(b"\r").strip(b" ")
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


CONTAINERS: dict[str, Callable[[bytes, bytes], bool]] = {
    "qcow2": qcow2,
    "vhd": vhd,
    "vhdx": vhdx,
    "vmdk": vmdk,
}

_FS_MAGIC = [
    (1080, b"\x53\xef"),  # ext2/3/4
    (0, b"XFSB"),
    (0x10040, b"_BHRfS_M"),  # btrfs (beyond the head; checked when present)
    (3, b"NTFS    "),
    (0x36, b"FAT"),
    (0x52, b"FAT32   "),
    (0xFF6, b"SWAPSPACE2"),
    (0x8001, b"CD001"),
    (512, b"LABELONE"),  # LVM physical volume
    (0, b"\xeb\x3c\x90"),
]


def raw_disk(head: bytes, tail: bytes) -> bool:
    """A raw disk is accepted only when it looks like one: a partition table or a filesystem."""
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return True
    if head[512:520] == b"EFI PART":
        return True
    if any(head[off : off + len(magic)] == magic for off, magic in _FS_MAGIC):
        return True
    return len(head) >= 4096 and not any(head[:4096])  # a blank disk


UNSUPPORTED: list[tuple[str, Callable[[bytes], bool], str]] = [
    (
        "VDI",
        lambda h: h[64:68] == b"\x7f\x10\xda\xbe",
        "convert it with `qemu-img convert -O qcow2`",
    ),
    ("QED", lambda h: h[:4] == b"QED\0", "convert it with `qemu-img convert -O qcow2`"),
    (
        "Parallels",
        lambda h: h[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"),
        "convert it with `qemu-img convert -O qcow2`",
    ),
    (
        "cloop",
        lambda h: h[:10] == b"#!/bin/sh\n" and b"cloop" in h[:256],
        "convert it with `qemu-img convert -O qcow2`",
    ),
    (
        "gzip archive",
        lambda h: h[:2] == b"\x1f\x8b",
        "decompress it (gunzip) and upload the image itself",
    ),
    (
        "xz archive",
        lambda h: h[:6] == b"\xfd7zXZ\0",
        "decompress it (unxz) and upload the image itself",
    ),
    ("bzip2 archive", lambda h: h[:3] == b"BZh", "decompress it and upload the image itself"),
    (
        "zstd archive",
        lambda h: h[:4] == b"\x28\xb5\x2f\xfd",
        "decompress it (unzstd) and upload the image itself",
    ),
    ("zip archive", lambda h: h[:4] == b"PK\x03\x04", "extract it and upload the image itself"),
    ("tar archive", lambda h: h[257:262] == b"ustar", "extract it and upload the image itself"),
    (
        "OVA/OVF descriptor",
        lambda h: h[:5] == b"<?xml",
        "upload the disk image (vmdk) itself, not the descriptor",
    ),
]


def iso9660(head: bytes) -> bool:
    return any(head[off : off + 5] == b"CD001" for off in (0x8001, 0x8801, 0x9001))


def luks(head: bytes) -> bool:
    return head[:6] == b"LUKS\xba\xbe" or head[:6] == b"SKUL\xba\xbe"
