"""qcow2: byte-exact against `qemu-img convert -O raw`, and refusal of damaged or hostile images.

Valid images are made by qemu-img and qemu-io; the hostile corpus is made by
patching fields of valid images with struct, so each refusal is tested against
exactly one defect.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    MiB,
    assert_tables_fetched_ahead,
    oracle_sha256,
    rehost_sha256,
    run,
    write_scattered,
)
from rehost.blob.source import LocalFile
from rehost.disk.target import open_disk
from rehost.errors import ENCRYPTED_HINT, SINGLE_FILE_HINT, ImageMetadataError
from rehost.image import open_image, qcow2, signatures
from rehost.image.base import DiskImage, ExtentKind
from rehost.image.convert import convert

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
TiB = 1 << 40

# -- valid images ---------------------------------------------------------------

CONVERTED: dict[str, list[str]] = {
    "v2": ["-o", "compat=0.10"],
    "v2-512": ["-o", "compat=0.10,cluster_size=512"],
    "v3-512": ["-o", "cluster_size=512"],
    "v3-4k": ["-o", "cluster_size=4k"],
    "v3-64k": [],
    "v3-2m": ["-o", "cluster_size=2M"],
    "zlib-v2": ["-c", "-o", "compat=0.10"],
    "zlib-4k": ["-c", "-o", "cluster_size=4k"],
    "zlib-64k": ["-c"],
    "zlib-2m": ["-c", "-o", "cluster_size=2M"],
    "zstd-4k": ["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    "zstd-64k": ["-c", "-o", "compression_type=zstd"],
    "zstd-2m": ["-c", "-o", "compression_type=zstd,cluster_size=2M"],
    "extl2-16k": ["-o", "extended_l2=on,cluster_size=16k"],
    "extl2-2m": ["-o", "extended_l2=on,cluster_size=2M"],
    "extl2-zlib": ["-c", "-o", "extended_l2=on"],
    "extl2-zstd": ["-c", "-o", "extended_l2=on,compression_type=zstd"],
    "lazy-refcounts": ["-o", "lazy_refcounts=on"],
    **{f"refcount-{bits}": ["-o", f"refcount_bits={bits}"] for bits in (1, 2, 4, 8, 16, 32, 64)},
}

# name: (options, qemu-io commands, whether to start from a conversion of the guest rather
# than from a fresh 16 MiB image)
WRITTEN: dict[str, tuple[list[str], list[str], bool]] = {
    "zero-flag": (
        [],
        ["write -z 1M 3M", "write -z 100k 10k", "write -P 0x11 5M 1M", "write -z 5M 64k"],
        True,
    ),
    "zero-v2": (["-o", "compat=0.10"], ["write -z 1M 3M", "write -P 0x11 5M 1M"], True),
    "zero-4k": (["-o", "cluster_size=4k"], ["write -z 1M 3M", "write -z 7k 2k"], True),
    "prealloc-metadata": (
        ["-o", "preallocation=metadata"],
        ["write -P 0xab 4096 8192", "write -z 64k 64k", "write -P 0xcd 3M 1M"],
        False,
    ),
    "prealloc-falloc": (
        ["-o", "preallocation=falloc,cluster_size=4k"],
        ["write -P 0xab 4096 8192", "write -z 64k 64k", "write -P 0xcd 3M 1M"],
        False,
    ),
    "extl2-subclusters": (
        ["-o", "extended_l2=on"],
        [
            "write -P 0xab 4096 8192",
            "write -z 64k 4k",
            "write -P 0xcd 3M 1M",
            "write -P 1 6000 100",
            "write -z 3M 2k",
            "write -P 2 16382k 1k",
        ],
        False,
    ),
    "extl2-prealloc-zero": (
        ["-o", "extended_l2=on,preallocation=metadata"],
        ["write -P 0xab 0 1M", "write -z 4k 8k", "write -z 2M 1M"],
        False,
    ),
    "dirty-lazy": (
        ["-o", "lazy_refcounts=on"],
        ["write -P 0xab 0 1M", "write -P 0xcd 3M 1M", "abort"],
        False,
    ),
}


def _qemu_io(img: Path, commands: list[str]) -> None:
    args = [a for c in commands for a in ("-c", c)]
    proc = subprocess.run(["qemu-io", *args, os.fspath(img)], capture_output=True, text=True)
    # `abort` simulates a crash (that is how a dirty image is made), so its status is expected.
    assert proc.returncode == 0 or commands[-1] == "abort", proc.stderr


def _snapshots(img: Path) -> None:
    run("qemu-img", "snapshot", "-c", "first", img)
    _qemu_io(img, ["write -P 0x77 2M 3M"])
    run("qemu-img", "snapshot", "-c", "second", img)
    _qemu_io(img, ["write -z 10M 1M", "write -P 0x78 20M 64k"])


def _unknown_extension(img: Path) -> None:
    """An unknown header extension before qemu's feature name table: it must be ignored."""
    data = bytearray(img.read_bytes())
    header_length = struct.unpack_from(">I", data, 100)[0]
    ext = struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0"
    data[header_length : header_length + 4096] = (ext + data[header_length : header_length + 4096])[
        :4096
    ]
    img.write_bytes(data)


def _set_dirty(img: Path) -> None:
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 72, struct.unpack_from(">Q", data, 72)[0] | 1)
    img.write_bytes(data)


class Images:
    """Builds each named image once per session, on first use."""

    def __init__(self, root: Path, guest: Path) -> None:
        self.root = root
        self.guest = guest
        self._built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> Path:
        img = self.root / f"{name}.qcow2"
        if name in CONVERTED:
            run("qemu-img", "convert", "-O", "qcow2", *CONVERTED[name], self.guest, img)
        elif name in WRITTEN:
            opts, commands, from_guest = WRITTEN[name]
            if from_guest:
                run("qemu-img", "convert", "-O", "qcow2", *opts, self.guest, img)
            else:
                run("qemu-img", "create", "-f", "qcow2", *opts, img, "16M")
            _qemu_io(img, commands)
        elif name == "snapshots":
            run("qemu-img", "convert", "-O", "qcow2", self.guest, img)
            _snapshots(img)
        elif name == "unknown-extension":
            run("qemu-img", "convert", "-O", "qcow2", self.guest, img)
            _unknown_extension(img)
        elif name == "dirty-patched":
            run("qemu-img", "convert", "-O", "qcow2", self.guest, img)
            _set_dirty(img)
        elif name == "sparse-8t":
            run("qemu-img", "create", "-f", "qcow2", img, "8T")
            _qemu_io(img, ["write -P 0x5a 5T 1M", "write -P 0x5b 8191G 64k"])
        else:
            raise KeyError(name)
        return img


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, guest_raw: Path) -> Images:
    return Images(tmp_path_factory.mktemp("qcow2"), guest_raw)


def _check_contract(img: DiskImage) -> None:
    """Extents are ordered, contiguous, cover exactly the disk, and point inside the file."""
    pos = 0
    for ext in img.extents():
        assert ext.offset == pos and ext.length > 0
        if ext.kind is ExtentKind.DATA:
            assert ext.host_offset + ext.length <= img.file_size
        if ext.kind is ExtentKind.COMPRESSED:
            assert ext.length <= img.cluster_size
            assert ext.host_offset + ext.host_length <= img.file_size
        pos = ext.end
    assert pos == img.virtual_size


def _sequential_sha256(path: Path) -> str:
    """Read every extent in order in this thread: the driver alone, without the converter."""
    h = hashlib.sha256()
    with qcow2.open(LocalFile(path)) as img:
        for ext in img.extents():
            for piece in ext.split(4 * MiB):
                h.update(img.read(piece))
    return h.hexdigest()


VALID = [*CONVERTED, *WRITTEN, "snapshots", "unknown-extension", "dirty-patched"]


@pytest.mark.parametrize("name", VALID)
def test_converts_like_qemu(name: str, images: Images, tmp_path: Path) -> None:
    path = images[name]
    with open_image(LocalFile(path)) as img:
        assert img.format == "qcow2"
        _check_contract(img)
        img.check()
    expected = oracle_sha256(path, tmp_path)
    assert _sequential_sha256(path) == expected
    assert rehost_sha256(path, tmp_path) == expected


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        ("v2", {"version": 2, "compat": "0.10", "cluster_bits": 16, "refcount_bits": 16}),
        ("v3-512", {"version": 3, "cluster_bits": 9, "extended_l2": False}),
        ("zstd-64k", {"compression_type": "zstd", "incompatible_features": ["compression type"]}),
        ("extl2-16k", {"extended_l2": True, "cluster_bits": 14}),
        ("refcount-1", {"refcount_bits": 1}),
        ("refcount-64", {"refcount_bits": 64}),
        (
            "lazy-refcounts",
            {"lazy_refcounts": True, "dirty": False, "compatible_features": ["lazy refcounts"]},
        ),
        ("dirty-lazy", {"lazy_refcounts": True, "dirty": True}),
        ("dirty-patched", {"dirty": True, "incompatible_features": ["dirty"]}),
        ("snapshots", {"snapshots": 2, "snapshot_names": ["first", "second"]}),
        ("unknown-extension", {"header_extensions": ["unknown 0x12345678", "feature name table"]}),
    ],
)
def test_details(name: str, facts: dict[str, object], images: Images) -> None:
    with open_image(LocalFile(images[name])) as img:
        info = img.info()
    assert info.format == "qcow2"
    assert "no backing file" in info.checks
    for key, value in facts.items():
        assert info.details[key] == value, key
    assert isinstance(info.details["l1_size"], int) and info.details["l1_size"] > 0


def test_v2_and_v3_subformats(images: Images) -> None:
    with open_image(LocalFile(images["v2"])) as v2, open_image(LocalFile(images["v3-64k"])) as v3:
        assert v2.subformat.startswith("v2") and v3.subformat.startswith("v3")
        assert v2.details["header_length"] == 72
        assert v3.cluster_size == 65536


def test_sparse_8t_walks_quickly(images: Images) -> None:
    """Time proportional to tables and data, not to the 8 TiB virtual size."""
    path = images["sparse-8t"]
    start = time.monotonic()
    with open_image(LocalFile(path)) as img:
        extents = list(img.extents())
        report = img.check()
    assert time.monotonic() - start < 3
    assert img.virtual_size == 8 * TiB
    assert len(extents) <= 5
    assert [e.kind for e in extents if e.kind is not ExtentKind.ZERO] == [ExtentKind.DATA] * 2
    assert report.data_bytes == MiB + 64 * 1024


def test_sparse_8t_converts_onto_sparse_file(images: Images) -> None:
    """ZERO extents are not written to a fresh sparse file, so this is quick and small."""
    out = Path("/dev/shm") / f"rehost-qcow2-8t-{os.getpid()}.raw"
    try:
        start = time.monotonic()
        with (
            open_image(LocalFile(images["sparse-8t"])) as img,
            open_disk(out, create_size=img.virtual_size) as disk,
        ):
            convert(img, disk)
        assert time.monotonic() - start < 10
        assert out.stat().st_blocks * 512 <= 8 * MiB
        with open(out, "rb") as f:
            f.seek(5 * TiB - 1)
            assert f.read(MiB + 2) == b"\0" + b"\x5a" * MiB + b"\0"
            f.seek(8191 * (1 << 30))
            assert f.read(64 * 1024) == b"\x5b" * 64 * 1024
    finally:
        out.unlink(missing_ok=True)


def test_detect() -> None:
    assert signatures.qcow2(b"QFI\xfb\0\0\0\3" + bytes(100), b"")
    assert signatures.qcow2(b"QFI\xfb\0\0\0\1" + bytes(100), b"")  # so that v1 is refused by name
    assert not signatures.qcow2(b"QFI\xfa" + bytes(100), b"")


# -- the hostile corpus -------------------------------------------------------------


def _be32(v: int) -> bytes:
    return struct.pack(">I", v)


def _be64(v: int) -> bytes:
    return struct.pack(">Q", v)


@dataclass
class Layout:
    """Where things are in a valid image, read with struct, for patching."""

    data: bytes

    def u32(self, off: int) -> int:
        return int(struct.unpack_from(">I", self.data, off)[0])

    def u64(self, off: int) -> int:
        return int(struct.unpack_from(">Q", self.data, off)[0])

    @property
    def cs(self) -> int:
        return 1 << self.u32(20)

    @property
    def l1(self) -> int:
        return self.u64(40)

    @property
    def rt(self) -> int:
        return self.u64(48)

    @property
    def far(self) -> int:
        """An aligned offset well past the end of the file."""
        return (len(self.data) // self.cs + 100) * self.cs

    @property
    def extended(self) -> bool:
        return self.u32(4) == 3 and bool(self.u64(72) & 16)

    def l1_entries(self) -> Iterator[tuple[int, int]]:
        for i in range(self.u32(36)):
            yield self.l1 + 8 * i, self.u64(self.l1 + 8 * i)

    def l2_entries(self) -> Iterator[tuple[int, int]]:
        """(file position, value) of every L2 entry's descriptor in the active tables."""
        width = 16 if self.extended else 8
        for _, l1e in self.l1_entries():
            l2 = l1e & OFFSET_MASK
            if l2:
                for pos in range(l2, l2 + self.cs, width):
                    yield pos, self.u64(pos)

    def first_l2(self) -> int:
        return next(v & OFFSET_MASK for _, v in self.l1_entries() if v & OFFSET_MASK)

    def data_entry(self) -> tuple[int, int]:
        return next(
            (p, v) for p, v in self.l2_entries() if v & OFFSET_MASK and not v & (COMPRESSED | 1)
        )

    def compressed_entry(self, min_bytes: int = 0) -> tuple[int, int, int, int]:
        """(entry position, entry, stream offset, stream bytes) of a compressed cluster."""
        shift = 62 - (self.u32(20) - 8)
        for pos, v in self.l2_entries():
            if v & COMPRESSED:
                desc = v & (COMPRESSED - 1)
                host = desc & ((1 << shift) - 1)
                stored = ((desc >> shift) + 1) * 512 - host % 512
                if stored >= min_bytes:
                    return pos, v, host, stored
        raise AssertionError("no compressed cluster")

    def refblock(self) -> int:
        return self.u64(self.rt) & OFFSET_MASK


Edits = list[tuple[int, bytes]]


def _extensions(layout: Layout, *exts: bytes) -> Edits:
    """Replace the header extension area with these extensions, then an end marker."""
    start = layout.u32(100)
    return [(start, b"".join(exts) + bytes(8))]


def _ext(kind: int, payload: bytes) -> bytes:
    return struct.pack(">II", kind, len(payload)) + payload + bytes(-len(payload) % 8)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def _stream(layout: Layout, make: Callable[[int], bytes]) -> Edits:
    """Replace a compressed cluster's stream with make(cluster_size)."""
    stream = make(layout.cs)
    _, _, host, _stored = layout.compressed_entry(len(stream))
    return [(host, stream)]


def _data_to(target: Callable[[Layout], int]) -> Callable[[Layout], Edits]:
    def edit(layout: Layout) -> Edits:
        pos, v = layout.data_entry()
        return [(pos, _be64((v & ~OFFSET_MASK) | target(layout)))]

    return edit


def _l1_to(target: Callable[[Layout], int]) -> Callable[[Layout], Edits]:
    def edit(layout: Layout) -> Edits:
        pos = next(p for p, v in layout.l1_entries() if v & OFFSET_MASK)
        return [(pos, _be64(COPIED | target(layout)))]

    return edit


def _compressed_to(host: Callable[[Layout], int]) -> Callable[[Layout], Edits]:
    def edit(layout: Layout) -> Edits:
        pos, v, _, _ = layout.compressed_entry()
        shift = 62 - (layout.u32(20) - 8)
        return [(pos, _be64((v & ~((1 << shift) - 1)) | host(layout)))]

    return edit


def _snapshot_entry(field: int, value: bytes) -> Callable[[Layout], Edits]:
    return lambda lay: [(lay.u64(64) + field, value)]


def _shared_l2(layout: Layout) -> Edits:
    """Every L1 entry names one L2 table of zero-flag entries: 8 TiB of table walking."""
    l2 = layout.first_l2()
    return [(l2, _be64(1) * (layout.cs // 8))] + [
        (pos, _be64(COPIED | l2)) for pos, _ in layout.l1_entries()
    ]


def _shared_data(layout: Layout) -> Edits:
    _, v = layout.data_entry()
    l2 = layout.first_l2()
    return [(l2, _be64(v) * (layout.cs // 8))]


def _alloc_without_host(layout: Layout) -> Edits:
    pos = next(p for p, v in layout.l2_entries() if v == 0 and layout.u64(p + 8) == 0)
    return [(pos + 8, _be64(1))]


def _alloc_and_zero(layout: Layout) -> Edits:
    pos, _ = layout.data_entry()
    return [(pos + 8, _be64(0xFFFF_FFFF | 1 << 32))]


def _compressed_bitmap(layout: Layout) -> Edits:
    pos, _, _, _ = layout.compressed_entry()
    return [(pos + 8, _be64(1))]


def _set(off: int, value: bytes) -> Callable[[Layout], Edits]:
    return lambda _: [(off, value)]


def _incompat(bits: int) -> Callable[[Layout], Edits]:
    return lambda lay: [(72, _be64(lay.u64(72) | bits))]


CORPUS: list[tuple[str, str, Callable[[Layout], Edits], str]] = [
    # header fields
    ("version-4", "v3-64k", _set(4, _be32(4)), "unsupported qcow2 version 4"),
    ("cluster-bits-8", "v3-64k", _set(20, _be32(8)), "cluster_bits 8 is outside"),
    ("cluster-bits-22", "v3-64k", _set(20, _be32(22)), "cluster_bits 22 is outside"),
    ("size-over-64t", "v3-64k", _set(24, _be64(65 * TiB)), "exceeds the 64 TiB limit"),
    ("size-zero", "v3-64k", _set(24, _be64(0)), "not positive"),
    ("header-length-short", "v3-64k", _set(100, _be32(96)), "header_length 96 is invalid"),
    ("header-length-odd", "v3-64k", _set(100, _be32(108)), "header_length 108 is invalid"),
    ("header-length-huge", "v3-64k", _set(100, _be32(65544)), "exceeds the 65536-byte cluster"),
    ("refcount-order-7", "v3-64k", _set(96, _be32(7)), "refcount_order 7 exceeds 6"),
    ("unknown-incompat", "v3-64k", _incompat(1 << 5), "unknown incompatible features: bit 5"),
    ("unknown-incompat-63", "v3-64k", _incompat(1 << 63), "bit 63"),
    ("raw-data-without-file", "v3-64k", _set(88, _be64(2)), "raw external data) is set"),
    ("compression-no-bit", "v3-64k", _set(104, b"\x01"), "disagrees with the compression-type"),
    ("compression-bit-only", "v3-64k", _incompat(8), "disagrees with the compression-type"),
    ("compression-unknown", "zstd-64k", _set(104, b"\x02"), "unknown compression_type 2"),
    (
        "extl2-small-clusters",
        "v3-64k",
        lambda lay: [(20, _be32(13)), (72, _be64(16))],
        "at least 16 KiB",
    ),
    # L1 table
    ("l1-size-zero", "v3-64k", _set(36, _be32(0)), "is too small for the virtual size"),
    ("l1-size-over-limit", "v3-64k", _set(36, _be32(5_000_000)), "exceeds qemu's limit"),
    ("l1-size-past-eof", "v3-64k", _set(36, _be32(4_000_000)), "beyond the end"),
    ("l1-past-eof", "v3-64k", lambda lay: [(40, _be64(lay.far))], "active L1 table at offset"),
    ("l1-misaligned", "v3-64k", lambda lay: [(40, _be64(lay.l1 + 512))], "is not aligned"),
    ("l1-in-header", "v3-64k", _set(40, _be64(0)), "overlaps the header cluster"),
    ("l1-on-reftable", "v3-64k", lambda lay: [(40, _be64(lay.rt))], "overlaps the active L1"),
    ("l1-reserved-bits", "v3-64k", _l1_to(lambda lay: lay.first_l2() | 1 << 57), "reserved bits"),
    # refcount structures
    (
        "reftable-misaligned",
        "v3-64k",
        lambda lay: [(48, _be64(lay.rt + 8))],
        "refcount table offset",
    ),
    ("reftable-past-eof", "v3-64k", lambda lay: [(48, _be64(lay.far))], "refcount table at"),
    ("reftable-in-header", "v3-64k", _set(48, _be64(0)), "overlaps the header cluster"),
    ("reftable-empty", "v3-64k", _set(56, _be32(0)), "refcount table is empty"),
    ("reftable-too-big", "v3-64k", _set(56, _be32(1000)), "8 MiB refcount table limit"),
    ("refblock-past-eof", "v3-64k", lambda lay: [(lay.rt, _be64(lay.far))], "refcount block"),
    (
        "refblock-misaligned",
        "v3-64k",
        lambda lay: [(lay.rt, _be64(lay.refblock() + 512))],
        "is not aligned",
    ),
    ("refblock-on-l1", "v3-64k", lambda lay: [(lay.rt, _be64(lay.l1))], "overlaps the active L1"),
    # L2 tables
    ("l2-past-eof", "v3-64k", _l1_to(lambda lay: lay.far), "lies beyond the end"),
    ("l2-misaligned", "v3-64k", _l1_to(lambda lay: lay.first_l2() + 512), "is not aligned"),
    ("l2-on-l1", "v3-64k", _l1_to(lambda lay: lay.l1), "overlaps the active L1 table"),
    ("l2-on-reftable", "v3-64k", _l1_to(lambda lay: lay.rt), "overlaps the refcount table"),
    ("l2-on-refblock", "v3-64k", _l1_to(lambda lay: lay.refblock()), "overlaps the refcount block"),
    ("l2-shared", "sparse-8t", _shared_l2, "more L2 tables are referenced"),
    # data clusters
    ("data-past-eof", "v3-64k", _data_to(lambda lay: lay.far), "lies beyond the end"),
    ("data-misaligned", "v3-64k", _data_to(lambda lay: lay.first_l2() + 512), "is not aligned"),
    ("data-on-l1", "v3-64k", _data_to(lambda lay: lay.l1), "overlaps the active L1 table"),
    ("data-on-reftable", "v3-64k", _data_to(lambda lay: lay.rt), "overlaps the refcount table"),
    ("data-on-own-l2", "v3-64k", _data_to(lambda lay: lay.first_l2()), "overlaps the L2 table"),
    (
        "data-reserved-bits",
        "v3-64k",
        _data_to(lambda lay: lay.first_l2() + (1 << 57)),
        "reserved bits",
    ),
    ("data-shared", "sparse-8t", _shared_data, "more data is referenced"),
    ("zero-flag-in-v2", "v2", lambda lay: [(lay.data_entry()[0] + 7, b"\x01")], "version 2 lacks"),
    # compressed clusters
    (
        "compressed-in-header",
        "zlib-64k",
        _compressed_to(lambda lay: 100),
        "overlaps the header cluster",
    ),
    (
        "compressed-on-l1",
        "zlib-64k",
        _compressed_to(lambda lay: lay.l1 + 10),
        "overlaps the active L1 table",
    ),
    (
        "compressed-past-eof",
        "zlib-64k",
        _compressed_to(lambda lay: len(lay.data) + 10),
        "lies beyond the end",
    ),
    (
        "compressed-copied",
        "zlib-64k",
        lambda lay: [(lay.compressed_entry()[0], _be64(lay.compressed_entry()[1] | COPIED))],
        "copied flag",
    ),
    (
        "deflate-garbled",
        "zlib-64k",
        lambda lay: _stream(lay, lambda cs: bytes([0xFF]) * 64),
        "deflate stream is garbled",
    ),
    (
        "deflate-short",
        "zlib-64k",
        lambda lay: _stream(lay, lambda cs: _deflate(b"x" * (cs // 2))),
        "deflate stream",
    ),
    (
        "deflate-long",
        "zlib-64k",
        lambda lay: _stream(lay, lambda cs: _deflate(bytes(2 * cs))),
        "decodes to",
    ),
    (
        "zstd-garbled",
        "zstd-64k",
        lambda lay: _stream(lay, lambda cs: b"\x28\xb5\x2f\xfd" + bytes([0xFF]) * 64),
        "zstd stream is garbled",
    ),
    (
        "zstd-wrong-size",
        "zstd-64k",
        lambda lay: _stream(lay, lambda cs: zstandard.ZstdCompressor().compress(bytes(cs // 2))),
        "zstd stream is garbled",
    ),
    # extended L2
    ("extl2-alloc-and-zero", "extl2-16k", _alloc_and_zero, "both allocated and zero"),
    ("extl2-alloc-without-host", "extl2-16k", _alloc_without_host, "has no host offset"),
    ("extl2-compressed-bitmap", "extl2-zlib", _compressed_bitmap, "non-zero subcluster bitmap"),
    (
        "extl2-zero-bit-reserved",
        "extl2-16k",
        lambda lay: [(lay.data_entry()[0] + 7, bytes([lay.data[lay.data_entry()[0] + 7] | 1]))],
        "reserved bits",
    ),
    # header extensions
    (
        "ext-too-long",
        "v3-64k",
        lambda lay: [(lay.u32(100), struct.pack(">II", 0x1234, 65536))],
        "claims 65536 bytes",
    ),
    (
        "ext-end-too-long",
        "v3-64k",
        lambda lay: [(lay.u32(100), struct.pack(">II", 0, 0xFE000000))],
        "extension 0x0 at offset 112 claims 4261412864 bytes",
    ),
    (
        "ext-too-many",
        "v3-64k",
        lambda lay: _extensions(lay, *[_ext(0x1234, b"")] * 65),
        "more than 64 header extensions",
    ),
    (
        "ext-duplicate",
        "v3-64k",
        lambda lay: _extensions(lay, _ext(0x23852875, bytes(24)), _ext(0x23852875, bytes(24))),
        "appears twice",
    ),
    # snapshots
    ("snapshots-too-many", "v3-64k", _set(60, _be32(70000)), "nb_snapshots 70000 exceeds"),
    (
        "snapshot-table-past-eof",
        "v3-64k",
        lambda lay: [(60, _be32(1)), (64, _be64(lay.far))],
        "snapshot table at offset",
    ),
    (
        "snapshot-table-misaligned",
        "snapshots",
        lambda lay: [(64, _be64(lay.u64(64) + 8))],
        "snapshot table offset",
    ),
    (
        "snapshot-table-on-l1",
        "snapshots",
        lambda lay: [(64, _be64(lay.l1))],
        "snapshot table overlaps the active L1 table",
    ),
    ("snapshot-table-truncated", "snapshots", _set(60, _be32(5000)), "snapshot table entry"),
    ("snapshot-extra-too-big", "snapshots", _snapshot_entry(36, _be32(2000)), "extra data"),
    (
        "snapshot-l1-past-eof",
        "snapshots",
        lambda lay: _snapshot_entry(0, _be64(lay.far))(lay),
        "snapshot 0's L1 table",
    ),
    (
        "snapshot-l1-on-active",
        "snapshots",
        lambda lay: _snapshot_entry(0, _be64(lay.l1))(lay),
        "overlaps the active L1 table",
    ),
    (
        "snapshot-l1-too-big",
        "snapshots",
        _snapshot_entry(8, _be32(5_000_000)),
        "exceeds qemu's limit",
    ),
]


def _patch(src: Path, dst: Path, edits: Edits) -> Path:
    data = bytearray(src.read_bytes())
    for off, value in edits:
        data[off : off + len(value)] = value
    dst.write_bytes(data)
    return dst


def _refusal(path: Path, *, driver: bool = False) -> ImageMetadataError:
    """Open the image and walk it completely; return the refusal."""
    opener: Callable[[LocalFile], DiskImage] = qcow2.open if driver else open_image
    with (
        pytest.raises(ImageMetadataError) as info,
        LocalFile(path) as src,
        opener(src) as img,
    ):
        img.check()
    assert info.value.code == "IMAGE_METADATA_UNREADABLE"
    return info.value


@pytest.mark.parametrize(("name", "base", "edit", "reason"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_refused(
    name: str,
    base: str,
    edit: Callable[[Layout], Edits],
    reason: str,
    images: Images,
    tmp_path: Path,
) -> None:
    src = images[base]
    path = _patch(src, tmp_path / f"{name}.qcow2", edit(Layout(src.read_bytes())))
    start = time.monotonic()
    err = _refusal(path)
    assert reason in err.reason, err.reason
    assert time.monotonic() - start < 5


def test_bad_magic(images: Images, tmp_path: Path) -> None:
    path = _patch(images["v3-64k"], tmp_path / "magic.qcow2", [(0, b"QFI\xfa")])
    assert "bad qcow2 magic" in _refusal(path, driver=True).reason


def test_qcow_v1_refused_by_name(images: Images, tmp_path: Path) -> None:
    path = _patch(images["v3-64k"], tmp_path / "v1.qcow", [(4, _be32(1))])
    err = _refusal(path)
    assert "qcow version 1 is not supported" in err.reason
    assert "qemu-img convert" in err.hint


@pytest.mark.parametrize(("keep", "reason"), [(50, "72-byte"), (90, "104-byte")])
def test_truncated_header(keep: int, reason: str, images: Images, tmp_path: Path) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(images["v3-64k"].read_bytes()[:keep])
    assert reason in _refusal(path, driver=True).reason


def test_truncated_in_half_refused_although_qemu_converts_it(
    images: Images, tmp_path: Path
) -> None:
    data = images["v3-4k"].read_bytes()
    path = tmp_path / "half.qcow2"
    path.write_bytes(data[: len(data) // 2])
    oracle_sha256(path, tmp_path)  # qemu-img exits 0, reading zeros past EOF
    assert "truncated" in _refusal(path).reason


def test_l1_past_eof_refused_although_qemu_converts_it(images: Images, tmp_path: Path) -> None:
    src = images["v3-64k"]
    path = _patch(src, tmp_path / "l1.qcow2", [(40, _be64(Layout(src.read_bytes()).far))])
    oracle_sha256(path, tmp_path)  # qemu-img exits 0
    err = _refusal(path)
    assert "active L1 table" in err.reason and "beyond the end" in err.reason


@pytest.mark.parametrize("base", ["v3-4k", "zlib-64k", "extl2-16k", "snapshots"])
def test_truncated_anywhere(base: str, images: Images, tmp_path: Path) -> None:
    """Cut at many points: a refusal, or (when only bytes past the guest's end were cut,
    e.g. the tail of the last partial cluster) the same conversion; never a crash."""
    data = images[base].read_bytes()
    expected = oracle_sha256(images[base], tmp_path)
    path = tmp_path / "cut.qcow2"
    rng = random.Random(base)
    for cut in [*sorted(rng.sample(range(1, len(data) - 1), 12)), len(data) - 1]:
        path.write_bytes(data[:cut])
        try:
            with qcow2.open(LocalFile(path)) as img:
                img.check()
        except ImageMetadataError:
            continue
        assert _sequential_sha256(path) == expected, cut


def test_backing_file_refused(images: Images, tmp_path: Path) -> None:
    path = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", images["v2"], "-F", "qcow2", path)
    err = _refusal(path)
    assert "backing file" in err.reason and "v2.qcow2" in err.reason
    assert err.hint == SINGLE_FILE_HINT


def test_external_data_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "df.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", path, "4M")
    err = _refusal(path)
    assert "external data file" in err.reason and "d.raw" in err.reason
    assert err.hint == SINGLE_FILE_HINT


def test_external_data_file_bit_refused(images: Images, tmp_path: Path) -> None:
    src = images["v3-64k"]
    path = _patch(src, tmp_path / "dfbit.qcow2", _incompat(4)(Layout(src.read_bytes())))
    err = _refusal(path)
    assert "incompatible feature bit 2" in err.reason
    assert err.hint == SINGLE_FILE_HINT


def test_data_file_extension_refused(images: Images, tmp_path: Path) -> None:
    src = images["v3-64k"]
    edits = _extensions(Layout(src.read_bytes()), _ext(0x44415441, b"elsewhere.raw"))
    err = _refusal(_patch(src, tmp_path / "dfext.qcow2", edits))
    assert "elsewhere.raw" in err.reason
    assert err.hint == SINGLE_FILE_HINT


def test_corrupt_bit_refused(images: Images, tmp_path: Path) -> None:
    """qemu reads images it marked corrupt only to salvage them; rehost refuses them."""
    src = images["v3-64k"]
    err = _refusal(_patch(src, tmp_path / "c.qcow2", _incompat(2)(Layout(src.read_bytes()))))
    assert "corrupt" in err.reason
    assert "qemu-img check -r all" in err.hint


ENCRYPT = ["qemu-img", "create", "-f", "qcow2", "--object", "secret,id=sec0,data=abc"]


def _luks(path: Path) -> None:
    # qemu's PBKDF benchmark sometimes fails with "Unable to get accurate CPU usage": retry.
    for _ in range(5):
        opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
        args = [*ENCRYPT, "-o", opts, os.fspath(path), "4M"]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


@pytest.mark.parametrize(("kind", "name"), [("luks", "LUKS"), ("aes", "AES")])
def test_encrypted_refused(kind: str, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.qcow2"
    if kind == "luks":
        _luks(path)
    else:
        run(*ENCRYPT, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", path, "4M")
    err = _refusal(path)
    assert f"{name} encryption" in err.reason
    assert err.hint == ENCRYPTED_HINT


def test_unknown_crypt_method_refused(images: Images, tmp_path: Path) -> None:
    err = _refusal(_patch(images["v3-64k"], tmp_path / "c7.qcow2", [(32, _be32(7))]))
    assert "crypt_method 7" in err.reason
    assert err.hint == ENCRYPTED_HINT


def test_fuzzed_metadata_fails_cleanly(images: Images, tmp_path: Path) -> None:
    """Random corruption of the header and tables: a typed refusal or a clean walk, quickly."""
    src = images["v3-4k"]
    data = src.read_bytes()
    layout = Layout(data)
    hot = [*range(0, 160), *range(layout.l1, layout.l1 + 64), *range(layout.rt, layout.rt + 16)]
    l2 = layout.first_l2()
    hot += list(range(l2, l2 + 256))
    rng = random.Random(7)
    path = tmp_path / "fuzz.qcow2"
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.choice(hot)] = rng.randrange(256)
        path.write_bytes(buf)
        start = time.monotonic()
        try:
            with qcow2.open(LocalFile(path)) as img:
                img.check()
        except ImageMetadataError:
            pass
        assert time.monotonic() - start < 5


def test_virtual_size_beyond_l1_limit(images: Images, tmp_path: Path) -> None:
    """64 TiB with 512-byte clusters needs more L1 entries than qemu allows: refused at once."""
    src = images["v3-512"]
    path = _patch(src, tmp_path / "huge.qcow2", [(24, _be64(64 * TiB))])
    assert "more than qemu's limit" in _refusal(path).reason


def test_the_walk_fetches_l2_tables_ahead_over_a_remote_source(tmp_path: Path) -> None:
    """Scattered L2 tables are hinted to the source ahead of the walk, several in flight."""
    raw, img_path = tmp_path / "sparse.raw", tmp_path / "tables.qcow2"
    write_scattered(raw, skip=4096)  # 4 KiB clusters: one 4 KiB L2 table per 2 MiB
    run("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=4096", raw, img_path)
    assert_tables_fetched_ahead(img_path)


# -- hand-built images: L2 tables exactly as given ---------------------------------


def _hand_built(
    path: Path,
    tables: list[bytes],
    *,
    cluster_bits: int = 16,
    size: int = 0,
    version: int = 3,
    incompat: int = 0,
    data: bytes = b"",
    spread: int = 1,
) -> Path:
    """A qcow2 of header, L1, refcount table and block, then `tables` (one cluster each, in
    order, named by every `spread`th L1 entry), then `data` padded to a cluster; `size`
    defaults to what the L1 table covers."""
    cs = 1 << cluster_bits
    width = 16 if incompat & 16 else 8
    l1 = bytearray(8 * len(tables) * spread)
    l1_clusters = -(-len(l1) // cs)
    for i in range(len(tables)):
        struct.pack_into(">Q", l1, 8 * i * spread, COPIED | (3 + l1_clusters + i) * cs)
    size = size or len(l1) // 8 * cs * (cs // width)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", version, 0, 0, cluster_bits, size, 0, len(l1) // 8,
        cs, (1 + l1_clusters) * cs, 1, 0, 0, incompat, 0, 0, 4, 104,
    )[: 72 if version == 2 else None]  # fmt: skip
    with open(path, "wb") as f:
        for part in (header, bytes(l1), _be64((2 + l1_clusters) * cs), b"", *tables, data):
            f.write(part.ljust(max(1, -(-len(part) // cs)) * cs, b"\0"))
    return path


def _reads(path: Path) -> list[object] | str:
    """The image's extents, or the reason it is refused."""
    try:
        with LocalFile(path) as src, qcow2.open(src) as img:
            return list(img.extents())
    except ImageMetadataError as e:
        return e.reason


def test_tables_of_zero_entries_walk_quickly(tmp_path: Path) -> None:
    """Zero entries need no host cluster, so 32 MiB of them describe 4M clusters: the walk
    judges such tables whole, not entry by entry (that took 4 s here, 15 s for 128 MiB)."""
    cs = 1 << 16
    pattern = [1, 0, COPIED | 1, COPIED, 5 * cs | 1, COPIED | (1 << 55) | 1]
    entries = (pattern * (cs // 8 // len(pattern) + 1))[: cs // 8]
    table = b"".join(_be64(e) for e in entries)
    path = _hand_built(tmp_path / "zero-entries.qcow2", [table] * 512)
    start = time.monotonic()
    with open_image(LocalFile(path)) as img:
        report = img.check()
    assert time.monotonic() - start < 1
    assert report.zero_bytes == img.virtual_size == 256 << 30


_STANDARD_ENTRIES = [
    0, 1, COPIED, COPIED | 1, 5 * 65536 | 1, 5 * 65536, COPIED | 5 * 65536, 5 * 65536 + 512 | 1,
    1 << 57 | 1, 2 | 1, 1 << 8 | 1, COMPRESSED | 5 * 65536, COMPRESSED | 1, 1 << 55 | 1,
]  # fmt: skip
_EXTENDED_ENTRIES = [
    (0, 0), (0, 0xFFFF_FFFF << 32), (0, 1 << 32), (5 * 16384, 0), (5 * 16384, 3 << 32),
    (COPIED | 5 * 16384, 0), (5 * 16384 | 1, 0), (5 * 16384 + 512, 0), (0, 1),
    (5 * 16384, 0xFFFF_FFFF), (5 * 16384, 1 | 1 << 32), (COMPRESSED | 5 * 16384, 0),
    (1 << 58, 0), (0, 1 << 63),
]  # fmt: skip


@settings(max_examples=150, deadline=None, database=None)
@given(
    version=st.sampled_from([2, 3]),
    extended=st.booleans(),
    pattern=st.lists(st.integers(0, len(_STANDARD_ENTRIES) - 1), min_size=1, max_size=4),
    odd=st.none() | st.tuples(st.integers(0, 1023), st.integers(0, 13)),
    short=st.integers(0, 3),
)
def test_whole_table_judgement_agrees_with_each_entry(
    version: int,
    extended: bool,
    pattern: list[int],
    odd: tuple[int, int] | None,
    short: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Judging a table whole accepts and refuses exactly what judging each entry does."""
    kinds = [*pattern * 1024][:1024]
    if odd:
        kinds[odd[0]] = odd[1]
    if extended:
        table = b"".join(_be64(d) + _be64(b) for d, b in (_EXTENDED_ENTRIES[k] for k in kinds))
        path, cs = tmp_path_factory.mktemp("extl2") / "t.qcow2", 16384
        path = _hand_built(path, [table], cluster_bits=14, size=(1024 - short) * cs, incompat=16)
    else:
        table = b"".join(_be64(_STANDARD_ENTRIES[k]) for k in kinds)
        path, cs = tmp_path_factory.mktemp("std") / "t.qcow2", 65536
        path = _hand_built(path, [table], size=(1024 - short) * cs, version=version)
    whole = _reads(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qcow2.Qcow2Image, "_reads_as_zero", lambda *_: False)
        assert _reads(path) == whole


def test_deflate_stream_without_its_end_is_read_as_qemu_reads_it(tmp_path: Path) -> None:
    """qemu takes a compressed cluster once it decodes to a whole cluster, whether or not its
    raw deflate stream goes on to an end marker; so does rehost (zlib grains must end)."""
    cs = 1 << 16
    c = zlib.compressobj(wbits=-15)
    stream = c.compress(b"\x5a" * cs) + c.flush(zlib.Z_SYNC_FLUSH)
    sectors = len(stream) // 512 + 1
    # Then empty stored blocks to the end of its sectors: no end marker, and no garbage.
    stream = (stream + b"\0\0\0\xff\xff" * 512)[: sectors * 512]
    entry = COMPRESSED | (sectors - 1) << 54 | 5 * cs
    path = _hand_built(tmp_path / "unended.qcow2", [_be64(entry)], size=cs, data=stream)
    assert rehost_sha256(path, tmp_path) == oracle_sha256(path, tmp_path)


def test_a_size_in_part_sectors_is_floored_as_qemu_does(images: Images, tmp_path: Path) -> None:
    """qemu's block layer sees whole 512-byte sectors: 3 bytes more in the header's size
    are not part of the disk."""
    src = images["v3-64k"]
    size = Layout(src.read_bytes()).u64(24)
    path = _patch(src, tmp_path / "odd.qcow2", [(24, _be64(size + 3))])
    with open_image(LocalFile(path)) as img:
        assert img.virtual_size == size
    assert rehost_sha256(path, tmp_path) == oracle_sha256(path, tmp_path)


def test_a_sparse_l1_table_walks_quickly(tmp_path: Path) -> None:
    """Unallocated L1 entries are skipped, not walked one by one: 2M of them in a 16 MiB
    file, a table every 64K entries so that no slice of the L1 table is all zeros, took 5 s."""
    table = _be64(1) * 64
    path = _hand_built(tmp_path / "sparse-l1.qcow2", [table] * 32, cluster_bits=9, spread=65536)
    start = time.monotonic()
    with open_image(LocalFile(path)) as img:
        report = img.check()
    assert time.monotonic() - start < 1
    assert report.zero_bytes == img.virtual_size == 64 << 30


def test_a_compressed_stream_named_by_every_entry_is_refused(tmp_path: Path) -> None:
    """A 10 MiB file whose L2 entries all name one compressed stream described 512 GiB to
    decompress (the walk counted only data clusters against the file size). Each stream
    now needs bytes of its own, past the sector of slack qemu's packing leaves."""
    path, cs = tmp_path / "shared.qcow2", 2 << 20
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, "1T"],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -c -P 0x5a 0 {cs}", path],
        check=True,
        capture_output=True,
    )
    layout = Layout(path.read_bytes())
    _, entry, _, _ = layout.compressed_entry()
    _patch(path, path, [(layout.first_l2(), _be64(entry) * (cs // 8))])
    start = time.monotonic()
    assert "more data is referenced" in _refusal(path).reason
    assert time.monotonic() - start < 5
