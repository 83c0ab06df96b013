"""vmdk driver (placeholder until the driver lands)."""

from __future__ import annotations

from rehost.blob.source import RangeSource
from rehost.errors import ImageMetadataError
from rehost.image.base import DiskImage


def detect(head: bytes, tail: bytes) -> bool:
    return head[:4] == b"KDMV" or head[:21] == b"# Disk DescriptorFile"


def open(src: RangeSource) -> DiskImage:
    raise ImageMetadataError("vmdk is not implemented yet")
