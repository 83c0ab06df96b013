"""qcow2 driver (placeholder until the driver lands)."""

from __future__ import annotations

from rehost.blob.source import RangeSource
from rehost.errors import ImageMetadataError
from rehost.image.base import DiskImage


def detect(head: bytes, tail: bytes) -> bool:
    return head[:4] == b"QFI\xfb"


def open(src: RangeSource) -> DiskImage:
    raise ImageMetadataError("qcow2 is not implemented yet")
