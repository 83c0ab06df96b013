"""The destination side of a disk: open, size, write, zero, flush."""

from rehost.disk.target import Disk, open_disk

__all__ = ["Disk", "open_disk"]
