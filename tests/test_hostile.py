"""Hostile input: mutated headers and tables give typed errors, quickly, in bounded memory.

Hypothesis mutates valid images of every format (bytes overwritten in headers,
tables and footers, extreme integers planted in fields, truncation anywhere) and
asserts that only typed rehost errors come out, within a time bound. A second
test runs a hostile corpus through the CLI in child processes and checks their
peak RSS against the 256 MiB bound.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MiB, run, write_guest
from rehost.blob.source import LocalFile
from rehost.errors import RehostError
from rehost.image import ExtentKind, open_image

FORMATS: dict[str, list[str]] = {
    "qcow2": ["-O", "qcow2", "-o", "cluster_size=4096"],
    "qcow2-v2": ["-O", "qcow2", "-o", "compat=0.10"],
    "qcow2-zlib": ["-c", "-O", "qcow2"],
    "qcow2-zstd": ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
    "vhd-fixed": ["-O", "vpc", "-o", "subformat=fixed"],
    "vhd-dynamic": ["-O", "vpc", "-o", "subformat=dynamic"],
    "vhdx": ["-O", "vhdx", "-o", "subformat=dynamic,block_size=1M"],
    "vmdk-sparse": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
}
READ_CAP = 64 * MiB
EXTREMES = [0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("hostile")
    raw = base / "g.raw"
    write_guest(raw, 3 * MiB + 3 * 512, seed=99)
    images = {}
    for name, args in FORMATS.items():
        out = base / f"g.{name}"
        run("qemu-img", "convert", *args, raw, out)
        images[name] = out.read_bytes()
    return images


def exercise(path: Path) -> None:
    """Open, check and read an image; only typed errors may escape."""
    try:
        # The source is ours until open_image returns an image: a refusal leaves it open.
        with LocalFile(path) as src, open_image(src) as img:
            img.check()
            budget = READ_CAP
            for ext in img.extents():
                if ext.kind is ExtentKind.DATA and budget > 0:
                    n = min(ext.length, budget)
                    assert len(img.read_exact(ext.host_offset, n, "data")) == n
                    budget -= n
    except RehostError as e:
        assert e.code and e.hint and e.reason


def test_exercise_closes_refused_images(corpus: dict[str, bytes], tmp_path: Path) -> None:
    """No descriptor leaks when a driver refuses: the fuzz tests exercise thousands."""
    path = tmp_path / "truncated.qcow2"
    path.write_bytes(corpus["qcow2"][:50])  # the qcow2 magic, then too short for the header
    before = os.listdir("/proc/self/fd")
    for _ in range(10):
        exercise(path)
    assert os.listdir("/proc/self/fd") == before


def _hot_offsets(size: int) -> st.SearchStrategy[int]:
    """Where the metadata lives: the head, and the tail for footers."""
    return st.one_of(
        st.integers(0, min(size - 1, 4096)),
        st.integers(0, min(size - 1, 1 << 18)),
        st.integers(max(0, size - 1536), size - 1),
        st.integers(0, size - 1),
    )


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["bytes", "field", "truncate"]))
        if kind == "truncate":
            return bytes(buf[: draw(st.integers(0, len(buf) - 1))])
        off = draw(_hot_offsets(len(buf)))
        if kind == "bytes":
            patch = draw(st.binary(min_size=1, max_size=8))
        else:
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(EXTREMES)) & ((1 << (8 * width)) - 1)
            order = draw(st.sampled_from(["<", ">"]))
            patch = struct.pack(order + ("I" if width == 4 else "Q"), value)
        buf[off : off + len(patch)] = patch[: len(buf) - off]
    return bytes(buf)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mutations_give_typed_errors(corpus: dict[str, bytes], fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"mutant.{fmt}"

    @settings(
        max_examples=int(os.environ.get("REHOST_FUZZ_EXAMPLES", "60")),
        deadline=3000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(mutations(corpus[fmt]))
    def one(mutant: bytes) -> None:
        path.write_bytes(mutant)
        exercise(path)

    one()


HOSTILE_QCOW2 = [
    # (name, field offset, struct format, value): big-endian qcow2 header fields
    ("huge-size", 24, ">Q", 64 << 40),
    ("huge-l1", 36, ">I", 0x0FFFFFFF),
    ("l1-past-eof", 40, ">Q", 1 << 50),
    ("refcount-past-eof", 48, ">Q", 1 << 45),
    ("many-snapshots", 60, ">I", 0xFFFFFFFF),
    ("tiny-clusters", 20, ">I", 9),
]


def test_hostile_corpus_fails_fast_in_bounded_memory(
    corpus: dict[str, bytes], tmp_path: Path
) -> None:
    """Each hostile image fails in seconds, and the checking process stays under 256 MiB."""
    cases = []
    for name, off, fmt, value in HOSTILE_QCOW2:
        buf = bytearray(corpus["qcow2"])
        struct.pack_into(fmt, buf, off, value)
        p = tmp_path / f"{name}.qcow2"
        p.write_bytes(buf)
        cases.append(p)
    half = tmp_path / "half.qcow2"
    half.write_bytes(corpus["qcow2"][: len(corpus["qcow2"]) // 2])
    cases.append(half)
    sparse = tmp_path / "sparse-64t.qcow2"  # legitimate: 64 TiB virtual, tiny data
    run("qemu-img", "create", "-f", "qcow2", sparse, "64T")
    run("qemu-io", "-c", "write -P 7 1T 1M", sparse)
    cases.append(sparse)
    for p in cases:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_WRAPPER, "image", "check", str(p)],
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - start
        peak = int(proc.stdout.strip().splitlines()[-1])
        if p is sparse:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == 1, (p.name, proc.stderr)
            assert "error: IMAGE_METADATA_UNREADABLE" in proc.stderr, (p.name, proc.stderr)
        assert elapsed < 20, (p.name, elapsed)
        assert peak <= 256 * MiB, (p.name, peak)


# ru_maxrss from wait4 inherits the parent's high-water mark across fork and exec, so
# the CLI runs under a wrapper that prints its own process's VmHWM as it exits.
_PEAK_RSS_WRAPPER = """
import sys
from rehost.cli.app import main
sys.argv[0] = "rehost"
try:
    main()
    status = 0
except SystemExit as e:
    status = e.code if isinstance(e.code, int) else 1
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)
sys.exit(status)
"""
