"""Disk-image drivers behind one interface: `open_image(src) -> DiskImage`."""

from rehost.image.base import DiskImage, Extent, ExtentKind, ImageInfo
from rehost.image.probe import detect_format, open_image

__all__ = ["DiskImage", "Extent", "ExtentKind", "ImageInfo", "detect_format", "open_image"]
