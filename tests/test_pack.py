"""`rehost image pack`: any image → a compressed qcow2 that qemu accepts and reads back exactly."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import MiB, oracle_sha256, rehost_sha256, run, sha256_file
from rehost.blob.source import LocalFile
from rehost.errors import DestinationError, ImageMetadataError
from rehost.image import open_image, pack
from rehost.image.base import DiskImage, Extent, ExtentKind

TiB = 1 << 40


def _qemu_check(image: Path) -> None:
    proc = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found on the image." in proc.stdout, proc.stdout
    assert "leaked" not in proc.stdout + proc.stderr


def _qemu_info(image: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(run("qemu-img", "info", "--output=json", image))
    return info


def _verified(packed: Path, expected_sha: str, tmp: Path) -> None:
    """qemu-img check is clean, and qemu and rehost both read back exactly the source."""
    _qemu_check(packed)
    assert oracle_sha256(packed, tmp, "qcow2") == expected_sha
    assert rehost_sha256(packed, tmp) == expected_sha


def _pack_file(
    src: Path,
    dest: Path,
    compression: str = "zstd",
    cluster_size: int = 65536,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> pack.PackResult:
    with open_image(LocalFile(src)) as img:
        return pack.pack(
            img,
            dest,
            compression=compression,
            cluster_size=cluster_size,
            workers=workers,
            progress=progress,
        )


# -- sources made by qemu-img --------------------------------------------------------

_SOURCES: dict[str, list[str]] = {
    "raw": [],
    "qcow2": ["-O", "qcow2"],
    "qcow2-compressed-2M": ["-c", "-O", "qcow2", "-o", "cluster_size=2M"],
    "vhd": ["-O", "vpc", "-o", "force_size=on"],
}


@pytest.fixture(scope="session")
def make_source(
    guest_raw: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, str]]:
    """A source image of the named kind and qemu's sha256 of its guest bytes (cached)."""
    folder = tmp_path_factory.mktemp("pack-sources")
    cache: dict[str, tuple[Path, str]] = {}

    def make(kind: str) -> tuple[Path, str]:
        if kind not in cache:
            if kind == "raw":
                path = guest_raw
            else:
                path = folder / f"guest.{kind}"
                run("qemu-img", "convert", "-f", "raw", *_SOURCES[kind], guest_raw, path)
            cache[kind] = (path, oracle_sha256(path, folder))
        return cache[kind]

    return make


@pytest.mark.parametrize("compression", ["zstd", "zlib"])
@pytest.mark.parametrize("kind", list(_SOURCES))
def test_round_trip(
    make_source: Callable[[str], tuple[Path, str]], kind: str, compression: str, tmp_path: Path
) -> None:
    src, sha = make_source(kind)
    dest = tmp_path / "packed.qcow2"
    result = _pack_file(src, dest, compression=compression)
    _verified(dest, sha, tmp_path)
    info = _qemu_info(dest)
    specific = info["format-specific"]
    assert isinstance(specific, dict)
    assert specific["data"]["compat"] == "1.1"
    assert specific["data"]["compression-type"] == compression
    assert specific["data"]["refcount-bits"] == 16
    assert info["cluster-size"] == 65536
    assert result.file_size == dest.stat().st_size
    assert result.virtual_size == info["virtual-size"]
    assert result.data_clusters + result.zero_clusters == -(-result.virtual_size // 65536)
    assert result.file_size < src.stat().st_size // 2  # the guest's text compresses well
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.qcow2"]


@pytest.mark.parametrize("cluster_size", [512, 4096, 2 * MiB])
def test_other_cluster_sizes(
    make_source: Callable[[str], tuple[Path, str]], cluster_size: int, tmp_path: Path
) -> None:
    """512-byte clusters: many L2 tables and refcount blocks written mid-stream; 2 MiB: few."""
    src, sha = make_source("raw")
    dest = tmp_path / "packed.qcow2"
    _pack_file(src, dest, compression="zstd", cluster_size=cluster_size)
    _verified(dest, sha, tmp_path)
    assert _qemu_info(dest)["cluster-size"] == cluster_size


def test_matches_qemu_compressed_size(
    make_source: Callable[[str], tuple[Path, str]], tmp_path: Path
) -> None:
    """Byte-granular packing: as small as `qemu-img convert -c` with the same codec and level."""
    src, _ = make_source("raw")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _pack_file(src, ours, compression="zstd")
    run(
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        src,
        theirs,
    )
    assert ours.stat().st_size <= theirs.stat().st_size * 1.01


def test_mixed_clusters_and_full_refcounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressible and incompressible clusters alternate, so aligned clusters keep
    interrupting the packed streams; a low refcount ceiling forces fresh clusters."""
    rng = random.Random(5)
    cs = 4096
    src = tmp_path / "mixed.raw"
    with open(src, "wb") as f:
        for i in range(2048):
            choice = rng.choice(["random", "text", "text", "zero", "byte"])
            if choice == "random":
                f.write(rng.randbytes(cs))
            elif choice == "text":
                f.write((b"cluster %5d of text " % i * 300)[:cs])
            elif choice == "byte":
                f.write(bytes([i % 255 + 1]) * cs)
            else:
                f.write(bytes(cs))
        f.seek(510)
        f.write(b"\x55\xaa")
    sha = sha256_file(src)
    monkeypatch.setattr(pack, "_REFCOUNT_MAX", 3)
    for compression in ("zstd", "zlib"):
        dest = tmp_path / f"mixed-{compression}.qcow2"
        _pack_file(src, dest, compression=compression, cluster_size=cs, workers=2)
        _verified(dest, sha, tmp_path)


def test_mostly_zero_disk_takes_little_space(tmp_path: Path) -> None:
    src = tmp_path / "sparse.raw"
    rng = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        f.write(bytes(510) + b"\x55\xaa")
        for where in (3 * MiB + 4096, 100 * MiB + 17, 255 * MiB):
            f.seek(where)
            f.write(rng.randbytes(MiB // 2))
    dest = tmp_path / "sparse.qcow2"
    seen: list[int] = []
    result = _pack_file(src, dest, progress=seen.append)
    _verified(dest, sha256_file(src), tmp_path)
    assert sum(seen) == 256 * MiB
    assert result.data_clusters == 1 + 9 + 9 + 8  # the MBR, then half-MiB runs at odd offsets
    assert result.file_size < 3 * MiB  # 1.5 MiB of data, incompressible, plus metadata


def test_all_zero_disk_is_tiny(tmp_path: Path) -> None:
    src = tmp_path / "zero.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    dest = tmp_path / "zero.qcow2"
    with LocalFile(src) as lf:
        result = pack.pack(open_image(lf, "raw"), dest, compression="zlib")
    _qemu_check(dest)
    assert oracle_sha256(dest, tmp_path) == sha256_file(src)
    assert result.data_clusters == 0
    assert result.zero_clusters == 1024
    assert result.file_size == 4 * 65536  # header, L1, refcount table, refcount block


# -- synthetic images: huge sparse disks and failures ---------------------------------


class _MemorySource:
    """A RangeSource with nothing behind it: synthetic images serve their own bytes."""

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def name(self) -> str:
        return "memory"

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        raise AssertionError("synthetic images never read their source")

    def close(self) -> None:
        pass


class _Synthetic(DiskImage):
    """Data regions at given guest offsets, ZERO extents between them that must not be read."""

    format = "synthetic"

    def __init__(self, size: int, regions: dict[int, bytes]) -> None:
        super().__init__(_MemorySource(size))
        self.virtual_size = size
        self.regions = dict(sorted(regions.items()))
        self.bytes_read = 0
        self._lock = threading.Lock()

    def extents(self) -> Iterator[Extent]:
        pos = 0
        for off, data in self.regions.items():
            if off > pos:
                yield Extent(pos, off - pos, ExtentKind.ZERO)
            yield Extent(off, len(data), ExtentKind.DATA, off)
            pos = off + len(data)
        if pos < self.virtual_size:
            yield Extent(pos, self.virtual_size - pos, ExtentKind.ZERO)

    def read(self, extent: Extent) -> bytes:
        assert extent.kind is ExtentKind.DATA, f"{extent} should not have been read"
        with self._lock:
            self.bytes_read += extent.length
        for off, data in self.regions.items():
            if off <= extent.offset < off + len(data):
                start = extent.offset - off
                return data[start : start + extent.length]
        raise AssertionError(f"no region holds {extent}")


def test_huge_sparse_disk_packs_in_time_proportional_to_its_data(tmp_path: Path) -> None:
    regions = {
        0: b"\xab" * MiB,
        3 * TiB + 12345 * 512: b"\xcd" * (3 * MiB),
        8 * TiB - 192 * 1024: b"\xef" * (64 * 1024),
    }
    img = _Synthetic(8 * TiB, regions)
    dest = tmp_path / "huge.qcow2"
    seen: list[int] = []
    began = time.monotonic()
    result = pack.pack(img, dest, progress=seen.append)
    assert time.monotonic() - began < 10
    assert sum(seen) == 8 * TiB
    assert img.bytes_read == 4 * MiB + 64 * 1024
    assert result.virtual_size == 8 * TiB
    assert result.file_size < 1 * MiB  # the L1 for 8 TiB is 128 KiB; three L2 tables
    _qemu_check(dest)
    for off, data in regions.items():
        run("qemu-io", "-f", "qcow2", "-c", f"read -P {data[0]} {off} {len(data)}", dest)
    mapping = json.loads(run("qemu-img", "map", "--output=json", dest))
    allocated = [(m["start"], m["length"]) for m in mapping if m["data"]]
    assert allocated == [
        (0, MiB),
        (3 * TiB + 12288 * 512, 3 * MiB + 64 * 1024),  # the run starts and ends mid-cluster
        (8 * TiB - 192 * 1024, 64 * 1024),
    ]
    with LocalFile(dest) as lf, open_image(lf) as packed:
        assert packed.virtual_size == 8 * TiB
        assert packed.allocated_bytes() == MiB + 3 * MiB + 64 * 1024 + 64 * 1024


def test_refcount_table_spans_clusters(tmp_path: Path) -> None:
    """512-byte clusters and 9 MiB of incompressible data need over 64 refcount blocks,
    so the refcount table (which counts itself) takes two clusters."""
    data = random.Random(9).randbytes(9 * MiB)
    dest = tmp_path / "rt.qcow2"
    pack.pack(_Synthetic(10 * MiB, {0: data}), dest, cluster_size=512)
    with open(dest, "rb") as f:
        header = f.read(112)
    assert struct.unpack_from(">I", header, 56)[0] == 2  # refcount_table_clusters
    _verified(dest, hashlib.sha256(data + bytes(MiB)).hexdigest(), tmp_path)


class _FailingRead(_Synthetic):
    def read(self, extent: Extent) -> bytes:
        if extent.offset >= 5 * MiB:
            raise ImageMetadataError(f"simulated failure reading guest offset {extent.offset}")
        return super().read(extent)


def test_failure_leaves_no_file_behind(tmp_path: Path) -> None:
    img = _FailingRead(16 * MiB, {0: os.urandom(12 * MiB)})
    dest = tmp_path / "out.qcow2"
    with pytest.raises(ImageMetadataError, match="simulated failure"):
        pack.pack(img, dest, workers=2)
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(b"an older pack")
    with pytest.raises(ImageMetadataError, match="simulated failure"):
        pack.pack(img, dest)
    assert list(tmp_path.iterdir()) == [dest]
    assert dest.read_bytes() == b"an older pack"


class _Gapped(_Synthetic):
    def extents(self) -> Iterator[Extent]:
        yield Extent(0, MiB, ExtentKind.DATA, 0)
        yield Extent(2 * MiB, MiB, ExtentKind.ZERO)


class _Short(_Synthetic):
    def extents(self) -> Iterator[Extent]:
        yield Extent(0, MiB, ExtentKind.DATA, 0)

    def read(self, extent: Extent) -> bytes:
        return super().read(extent)[:-1]


def test_a_reader_breaking_its_contract_is_refused(tmp_path: Path) -> None:
    """Extents must tile the disk and reads must be whole: anything else is refused."""
    with pytest.raises(ImageMetadataError, match="where one starting at 1048576 was expected"):
        pack.pack(_Gapped(3 * MiB, {0: bytes(MiB)}), tmp_path / "out.qcow2")
    with pytest.raises(ImageMetadataError, match="extents end at 1048576, not at the virtual"):
        pack.pack(_Short(3 * MiB, {0: bytes(MiB)}), tmp_path / "out.qcow2")
    with pytest.raises(ImageMetadataError, match="returned 1048575 bytes for the 1048576-byte"):
        pack.pack(_Short(MiB, {0: b"x" * MiB}), tmp_path / "out.qcow2")
    assert list(tmp_path.iterdir()) == []


def test_destination_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="cannot create"):
        pack.pack(_Synthetic(MiB, {}), tmp_path / "missing" / "out.qcow2")


def test_refcount_table_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack, "_MAX_REFTABLE_BYTES", 16)
    data = random.Random(2).randbytes(MiB)
    with pytest.raises(DestinationError, match="refcount table over 8 MiB"):
        pack.pack(_Synthetic(MiB, {0: data}), tmp_path / "out.qcow2", cluster_size=512)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("compression", "cluster_size", "message"),
    [
        ("lz4", 65536, "compression must be one of"),
        ("zstd", 1000, "not a power of two"),
        ("zstd", 256, "not a power of two"),
        ("zlib", 4 * MiB, "not a power of two"),
    ],
)
def test_bad_arguments(tmp_path: Path, compression: str, cluster_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack.pack(
            _Synthetic(MiB, {}),
            tmp_path / "x.qcow2",
            compression=compression,
            cluster_size=cluster_size,
        )
    assert list(tmp_path.iterdir()) == []


def test_unrepresentable_geometry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="not a multiple"):
        pack.pack(_Synthetic(MiB + 100, {}), tmp_path / "x.qcow2")
    with pytest.raises(DestinationError, match="L1 table over 32 MiB"):
        pack.pack(_Synthetic(64 * TiB, {}), tmp_path / "x.qcow2", cluster_size=512)
    assert list(tmp_path.iterdir()) == []


def _strict_inflate(stream: bytes) -> bytes:
    """Inflate with a 4 KiB window and a small output buffer: no reaching back past 4 KiB."""
    d = zlib.decompressobj(-12)
    out = b""
    while not d.eof:
        piece = d.decompress(stream, 512)
        stream = d.unconsumed_tail
        assert piece or d.eof, "the stream ended early"
        out += piece
    return out


def test_deflate_uses_qemu_window() -> None:
    """Repeats 5-30 KiB apart must not become back-references qemu's 4 KiB window rejects."""
    rng = random.Random(3)
    for distance in (3500, 5000, 9000, 30000):
        block = rng.randbytes(1500)
        cluster = ((block + rng.randbytes(distance - 1500)) * (65536 // distance + 1))[:65536]
        stream = pack._Compressor("zlib")(cluster)
        assert _strict_inflate(stream) == cluster
