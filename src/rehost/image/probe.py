"""Format detection that refuses what it cannot vouch for.

qemu's probe falls back to raw for anything it does not recognise, reads a
fixed VHD (whose only header is a footer at the end) as raw, and accepts
polyglots. Here every known signature is looked for at once: exactly one
container format may match; encrypted, archived and unsupported containers are
refused by name; and raw is accepted only when it looks like a disk.
"""

from __future__ import annotations

import importlib

from rehost.blob.source import RangeSource
from rehost.errors import ENCRYPTED_HINT, ImageMetadataError
from rehost.image import signatures
from rehost.image.base import DiskImage

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 512

FORMATS = (*signatures.CONTAINERS, "raw")
"""Each names its driver module, `rehost.image.<format>`, imported only when opened."""


def detect_format(src: RangeSource) -> str:
    head = src.read(0, min(HEAD_BYTES, src.size))
    tail = src.read(max(0, src.size - TAIL_BYTES), min(TAIL_BYTES, src.size))
    if src.size == 0:
        raise ImageMetadataError("the image file is empty")
    if signatures.luks(head):
        raise ImageMetadataError("the image is LUKS-encrypted", hint=ENCRYPTED_HINT)
    for name, matches, hint in signatures.UNSUPPORTED:
        if matches(head):
            raise ImageMetadataError(f"{name} is not a supported image format", hint=hint)
    found = [name for name, matches in signatures.CONTAINERS.items() if matches(head, tail)]
    if len(found) > 1:
        raise ImageMetadataError(
            f"the file carries the signatures of several formats ({', '.join(found)}); "
            "such a polyglot is refused because its meaning is ambiguous"
        )
    if found and signatures.iso9660(head):
        raise ImageMetadataError(
            f"the file carries both {found[0]} headers and an ISO9660 signature; "
            "such a polyglot is refused because its meaning is ambiguous"
        )
    if found:
        return found[0]
    if signatures.raw_disk(head, tail) and src.size % 512 == 0:
        return "raw"
    raise ImageMetadataError(
        "unknown format: no image header, partition table or filesystem signature was found",
        hint="upload a qcow2, vhd, vhdx, vmdk or raw disk image; if this really is a raw disk, "
        "pass --format raw",
    )


def open_image(src: RangeSource, format: str | None = None) -> DiskImage:
    """Detect the format (unless given) and validate the headers; refuse anything unsafe.

    The image returned owns `src` (closing it closes `src`); if opening fails, `src` is
    still the caller's to close.
    """
    name = format or detect_format(src)
    if name not in FORMATS:
        raise ImageMetadataError(f"unsupported format {name!r}")
    image: DiskImage = importlib.import_module(f"rehost.image.{name}").open(src)
    return image
