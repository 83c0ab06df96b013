"""Raw disks: no metadata, so the guest bytes are the file bytes."""

from __future__ import annotations

from collections.abc import Iterator

from rehost.blob.source import RangeSource
from rehost.image.base import DiskImage, Extent, ExtentKind, check_virtual_size

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


def detect(head: bytes, tail: bytes) -> bool:
    """A raw disk is accepted only when it looks like one: a partition table or a filesystem."""
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return True
    if head[512:520] == b"EFI PART":
        return True
    if any(head[off : off + len(magic)] == magic for off, magic in _FS_MAGIC):
        return True
    return len(head) >= 4096 and not any(head[:4096])  # a blank disk


class RawImage(DiskImage):
    format = "raw"

    def __init__(self, src: RangeSource) -> None:
        super().__init__(src)
        self.virtual_size = src.size
        check_virtual_size(self.virtual_size)
        self.checks = ["single file, no external references possible"]

    def extents(self) -> Iterator[Extent]:
        allocation = getattr(self.src, "allocation", None)
        if allocation is None:
            yield Extent(0, self.virtual_size, ExtentKind.DATA, 0)
            return
        for start, end, has_data in allocation():
            kind = ExtentKind.DATA if has_data else ExtentKind.ZERO
            yield Extent(start, end - start, kind, start if has_data else 0)


def open(src: RangeSource) -> RawImage:
    return RawImage(src)
