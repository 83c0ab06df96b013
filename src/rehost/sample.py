"""Sample guest disks with mixed content, for the demo, the tests and the benchmarks.

Regions of random data, compressible text, written zeros and holes are laid out
in runs whose boundaries deliberately do not align to any cluster size, so every
driver sees partial clusters, blocks and grains.
"""

from __future__ import annotations

import os
import random

MiB = 1 << 20
_TEXT = b"".join(b"line %d of compressible guest text\n" % i for i in range(40000))


def write_sample_disk(path: str | os.PathLike[str], size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rng.randrange(4096, 3 * MiB) + rng.randrange(0, 512))
            kind = rng.choice(["random", "text", "zero", "hole", "random"])
            if kind == "random":
                f.seek(pos)
                f.write(rng.randbytes(n))
            elif kind == "text":
                f.seek(pos)
                f.write((_TEXT * (n // len(_TEXT) + 1))[:n])
            elif kind == "zero":
                f.seek(pos)
                f.write(bytes(n))
            pos += n
        f.seek(0)
        f.write(_mbr(size))


def _mbr(size: int) -> bytes:
    """A boot sector with one Linux partition spanning the disk after the first MiB."""
    first = 2048
    count = min(size // 512 - first, 0xFFFFFFFF)
    entry = bytes([0, 0xFE, 0xFF, 0xFF, 0x83, 0xFE, 0xFF, 0xFF])
    entry += first.to_bytes(4, "little") + max(count, 0).to_bytes(4, "little")
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"
