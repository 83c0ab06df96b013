"""Bounded, exact-size decompression of one cluster or grain.

Every call decodes at most `expected` bytes, so a compression bomb cannot grow
memory, and refuses a stream that errors, ends short, or would decode to more
than one cluster; a zlib stream must also end in its Adler-32, as qemu's
VMDK reader insists, while raw deflate (qcow2) may stop once the cluster is
full, as qemu's qcow2 reader allows. ISA-L's inflate (the `isal` package) is used because it is
2-3x faster than zlib's and, like zlib and zstd, releases the GIL, which lets a
thread pool decompress on every core.
"""

from __future__ import annotations

import threading
import zlib

import zstandard
from isal import isal_zlib

from rehost.errors import ImageMetadataError

_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # stub says instance
_WBITS = {"deflate": -15, "zlib": 15}
_local = threading.local()


def _zstd() -> zstandard.ZstdDecompressor:
    """One decompressor per thread: zstandard's are not safe to share between threads."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "zstd", None)
    if dctx is None:
        dctx = _local.zstd = zstandard.ZstdDecompressor()
    return dctx


def decompress(codec: str, data: bytes | memoryview, expected: int, where: str) -> bytes:
    """Decode exactly `expected` bytes from `data`, which may carry trailing slack."""
    try:
        if codec == "zstd":
            out = _zstd_exact(data, expected)
        elif codec in _WBITS:
            out = _inflate_exact(data, expected, _WBITS[codec])
        else:
            raise ImageMetadataError(f"{where}: unknown compression {codec!r}")
    except (zlib.error, _ISAL_ERROR, zstandard.ZstdError, ValueError) as e:
        raise ImageMetadataError(f"{where}: the {codec} stream is garbled ({e})") from e
    if len(out) != expected:
        raise ImageMetadataError(
            f"{where}: the {codec} stream decodes to {len(out)} bytes, not {expected}"
        )
    return out


def _inflate_exact(data: bytes | memoryview, expected: int, wbits: int) -> bytes:
    d = isal_zlib.decompressobj(wbits)
    out: bytes = d.decompress(data, expected)
    if len(out) == expected and not d.eof:
        # The end-of-stream marker may be all that is left; anything more is excess output.
        out += d.decompress(d.unconsumed_tail, 1)
    if d.eof or len(out) > expected:
        return out  # decompress() refuses a wrong length
    if len(out) < expected:
        raise ValueError(f"the stream ends early after {len(out)} bytes")
    if wbits > 0:
        # A VMDK grain: qemu's uncompress() insists on the zlib trailer, an Adler-32.
        raise ValueError("the stream ends before its Adler-32 checksum")
    return out  # raw deflate (qcow2): qemu stops once the cluster is full, end or not


def _zstd_exact(data: bytes | memoryview, expected: int) -> bytes:
    # A frame header may declare any content size, and zstandard would allocate it: check first.
    declared = zstandard.frame_content_size(data)
    if declared not in (-1, expected):
        raise ValueError(f"the zstd frame declares {declared} bytes, not {expected}")
    out: bytes = _zstd().decompress(data, max_output_size=expected + 1, allow_extra_data=True)
    return out
