"""vhd driver (placeholder until the driver lands)."""

from __future__ import annotations

from rehost.blob.source import RangeSource
from rehost.errors import ImageMetadataError
from rehost.image.base import DiskImage


def detect(head: bytes, tail: bytes) -> bool:
    return head[:8] == b"conectix" or tail[-512:-504] == b"conectix"


def open(src: RangeSource) -> DiskImage:
    raise ImageMetadataError("vhd is not implemented yet")
