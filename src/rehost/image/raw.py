"""Raw disks: no metadata, so the guest bytes are the file bytes."""

from __future__ import annotations

from collections.abc import Iterator

from rehost.blob.source import RangeSource
from rehost.image.base import DiskImage, Extent, ExtentKind, check_virtual_size


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
