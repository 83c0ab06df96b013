"""Keep glibc from mapping and unmapping every large buffer.

By default glibc serves allocations over 128 KiB-32 MiB (adaptive) with mmap and
returns them with munmap, so every 4 MiB batch buffer costs ~1000 fresh page
faults: profiling showed this alone made a conversion ~1.7x slower. Raising the
mmap threshold above our largest buffer lets freed buffers be reused from the
heap; the trim threshold bounds what the heap may keep, so RSS stays bounded.
One arena: with one per thread (glibc's default, up to 8 per core), each of the
read-ahead, convert and verify threads kept its own freed buffers, and an
import's peak RSS was 230-290 MiB instead of ~180.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_done = False


def tune_for_streaming() -> None:
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
