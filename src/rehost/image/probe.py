"""Format detection that refuses what it cannot vouch for.

qemu's probe falls back to raw for anything it does not recognise, reads a
fixed VHD (whose only header is a footer at the end) as raw, and accepts
polyglots. Here every known signature is looked for at once: exactly one
container format may match; encrypted, archived and unsupported containers are
refused by name; and raw is accepted only when it looks like a disk.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from rehost.blob.source import RangeSource
from rehost.errors import ENCRYPTED_HINT, ImageMetadataError
from rehost.image import qcow2, raw, vhd, vhdx, vmdk
from rehost.image.base import DiskImage

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 512

DRIVERS: dict[str, ModuleType] = {
    "qcow2": qcow2,
    "vhd": vhd,
    "vhdx": vhdx,
    "vmdk": vmdk,
    "raw": raw,
}
CONTAINERS = ("qcow2", "vhd", "vhdx", "vmdk")

_UNSUPPORTED: list[tuple[str, Callable[[bytes], bool], str]] = [
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


def _iso9660(head: bytes) -> bool:
    return any(head[off : off + 5] == b"CD001" for off in (0x8001, 0x8801, 0x9001))


def _luks(head: bytes) -> bool:
    return head[:6] == b"LUKS\xba\xbe" or head[:6] == b"SKUL\xba\xbe"


def detect_format(src: RangeSource) -> str:
    head = src.read(0, min(HEAD_BYTES, src.size))
    tail = src.read(max(0, src.size - TAIL_BYTES), min(TAIL_BYTES, src.size))
    if src.size == 0:
        raise ImageMetadataError("the image file is empty")
    if _luks(head):
        raise ImageMetadataError("the image is LUKS-encrypted", hint=ENCRYPTED_HINT)
    for name, matches, hint in _UNSUPPORTED:
        if matches(head):
            raise ImageMetadataError(f"{name} is not a supported image format", hint=hint)
    found = [name for name in CONTAINERS if DRIVERS[name].detect(head, tail)]
    if len(found) > 1:
        raise ImageMetadataError(
            f"the file carries the signatures of several formats ({', '.join(found)}); "
            "such a polyglot is refused because its meaning is ambiguous"
        )
    if found and _iso9660(head):
        raise ImageMetadataError(
            f"the file carries both {found[0]} headers and an ISO9660 signature; "
            "such a polyglot is refused because its meaning is ambiguous"
        )
    if found:
        return found[0]
    if raw.detect(head, tail) and src.size % 512 == 0:
        return "raw"
    raise ImageMetadataError(
        "unknown format: no image header, partition table or filesystem signature was found",
        hint="upload a qcow2, vhd, vhdx, vmdk or raw disk image; if this really is a raw disk, "
        "pass --format raw",
    )


def open_image(src: RangeSource, format: str | None = None) -> DiskImage:
    """Detect the format (unless given) and validate the headers; refuse anything unsafe."""
    name = format or detect_format(src)
    if name not in DRIVERS:
        raise ImageMetadataError(f"unsupported format {name!r}")
    image: DiskImage = DRIVERS[name].open(src)
    return image
