"""VMDK: byte-exact against qemu-img, and every refusal the driver makes.

qemu-img writes monolithicSparse and a seekable streamOptimized with 64 KiB
grains only. The layouts VMware writes and qemu cannot (other grain sizes,
unallocated grain tables, a true stream whose grain directory and footer follow
the grains) are built here by `craft_vmdk`; qemu-img still reads them, so it
stays the oracle.
"""

from __future__ import annotations

import random
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from _pytest.mark import ParameterSet

from helpers import (
    MiB,
    assert_tables_fetched_ahead,
    oracle_sha256,
    rehost_sha256,
    run,
    write_guest,
    write_scattered,
)
from rehost.blob.source import LocalFile
from rehost.errors import SINGLE_FILE_HINT, ImageMetadataError
from rehost.image import ExtentKind, detect_format, open_image
from rehost.image.base import Extent

SECTOR = 512
GD_AT_END = (1 << 64) - 1
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
FIELDS = {  # name: (offset, struct code)
    "version": (4, "I"),
    "flags": (8, "I"),
    "capacity": (12, "Q"),
    "grain": (20, "Q"),
    "desc_offset": (28, "Q"),
    "desc_size": (36, "Q"),
    "gtes": (44, "I"),
    "rgd": (48, "Q"),
    "gd": (56, "Q"),
    "grain_offset": (64, "Q"),
    "check_bytes": (73, "4s"),
    "compress": (77, "H"),
}
DESCRIPTOR = """\
# Disk DescriptorFile
version=1
CID=1234abcd
parentCID=ffffffff
createType="{create_type}"

# Extent description
RW {capacity} SPARSE "{name}"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.adapterType = "lsilogic"
"""


# -- fixtures -------------------------------------------------------------------


def write_sparse_guest(path: Path, size: int, seed: int) -> None:
    """A mostly empty disk: data at the start, in the middle and in the partial last grain."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"\0" * 510 + b"\x55\xaa" + rng.randbytes(150_000))
        f.seek(size // 2 + 1000)
        f.write(b"compressible guest text\n" * 9000)
        f.seek(size - 5000)
        f.write(rng.randbytes(5000))


def craft_vmdk(
    raw: Path, out: Path, *, grain_sectors: int = 128, stream: bool = False, pad_final: bool = False
) -> None:
    """Write a VMDK as VMware does: any grain size, grain tables only where data is.

    stream=True writes a true streamOptimized file: grains behind markers, each grain
    table after its grains, then the grain directory, the footer and end-of-stream.
    pad_final compresses the partial last grain as a whole zero-padded grain.
    """
    data = raw.read_bytes()
    capacity = -(-len(data) // SECTOR)
    grain = grain_sectors * SECTOR
    grains = [data[i : i + grain] for i in range(0, capacity * SECTOR, grain)]
    n_gts = -(-len(grains) // 512)
    gd_sectors = -(-n_gts * 4 // SECTOR)
    allocated = [g.count(0) != len(g) for g in grains]
    used = [any(allocated[t * 512 : (t + 1) * 512]) for t in range(n_gts)]
    desc = DESCRIPTOR.format(
        create_type="streamOptimized" if stream else "monolithicSparse",
        capacity=capacity,
        name=out.name,
    ).encode()

    def header(gd: int, grain_offset: int) -> bytes:
        if stream:
            version, flags, compress = 3, 1 | 1 << 16 | 1 << 17, 1
        else:
            version, flags, compress = 1, 1, 0
        fields = HEADER.pack(
            b"KDMV", version, flags, capacity, grain_sectors, 1, 20, 512, 0, gd,
            grain_offset, 0, b"\n \r\n", compress,
        )  # fmt: skip
        return fields.ljust(SECTOR, b"\0")

    def pad(b: bytearray) -> None:
        b.extend(bytes(-len(b) % SECTOR))

    gd = [0] * n_gts
    if not stream:
        gt_start = 21 + gd_sectors
        gts_sectors = 4 * sum(used)
        grain_offset = gt_start + gts_sectors
        tables = bytearray()
        body = bytearray()
        for t in range(n_gts):
            if not used[t]:
                continue
            gd[t] = gt_start + len(tables) // SECTOR
            gt = [0] * 512
            for k, g in enumerate(grains[t * 512 : (t + 1) * 512]):
                if allocated[t * 512 + k]:
                    gt[k] = grain_offset + len(body) // SECTOR
                    body += g.ljust(grain, b"\0")
            tables += struct.pack("<512I", *gt)
        gd_bytes = bytearray(struct.pack(f"<{n_gts}I", *gd))
        pad(gd_bytes)
        out.write_bytes(
            header(21, grain_offset) + desc.ljust(20 * SECTOR, b"\0") + gd_bytes + tables + body
        )
        return
    image = bytearray(header(GD_AT_END, 21) + desc.ljust(20 * SECTOR, b"\0"))
    for t in range(n_gts):
        gt = [0] * 512
        for k, g in enumerate(grains[t * 512 : (t + 1) * 512]):
            if not allocated[t * 512 + k]:
                continue
            stream_bytes = zlib.compress(g.ljust(grain, b"\0") if pad_final else g)
            gt[k] = len(image) // SECTOR
            image += struct.pack("<QI", (t * 512 + k) * grain_sectors, len(stream_bytes))
            image += stream_bytes
            pad(image)
        if used[t]:
            image += struct.pack("<QII", 4, 0, 1).ljust(SECTOR, b"\0")
            gd[t] = len(image) // SECTOR
            image += struct.pack("<512I", *gt)
    image += struct.pack("<QII", gd_sectors, 0, 2).ljust(SECTOR, b"\0")
    gd_at = len(image) // SECTOR
    image += struct.pack(f"<{n_gts}I", *gd)
    pad(image)
    image += struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0")
    image += header(gd_at, 21)
    image += bytes(SECTOR)  # end-of-stream marker
    out.write_bytes(image)


def write_zeroed_grains(raws: dict[str, Path], out: Path) -> None:
    """Version 2 with the zeroed-grain flag: qemu-io's `write -z` sets GT entries to 1."""
    qemu_create(out, "3M", "zeroed_grain=on")
    run(
        "qemu-io", "-f", "vmdk",
        "-c", "write -P 0xab 0 2M", "-c", "write -z 512k 256k", "-c", "write -z 1M 1000",
        "-c", "write -P 0x5c 2700k 100k", out,
    )  # fmt: skip


def qemu_create(path: Path, size: str, options: str = "", *args: str | Path) -> None:
    opts = ["-o", options] if options else []
    run("qemu-img", "create", "-q", "-f", "vmdk", *opts, *args, path, *([size] if size else []))


Builder = Callable[[dict[str, Path], Path], None]


def qemu(raw: str, options: str) -> Builder:
    def build(raws: dict[str, Path], out: Path) -> None:
        run("qemu-img", "convert", "-O", "vmdk", "-o", options, raws[raw], out)

    return build


def crafted(
    raw: str, *, grain_sectors: int = 128, stream: bool = False, pad_final: bool = False
) -> Builder:
    def build(raws: dict[str, Path], out: Path) -> None:
        craft_vmdk(raws[raw], out, grain_sectors=grain_sectors, stream=stream, pad_final=pad_final)

    return build


BUILDERS: dict[str, Builder] = {
    "sparse": qemu("guest", "subformat=monolithicSparse"),
    "stream": qemu("guest", "subformat=streamOptimized"),
    "sparse-multi-gt": qemu("sparse", "subformat=monolithicSparse"),
    "stream-multi-gt": qemu("sparse", "subformat=streamOptimized"),
    "sparse-compat6": qemu("small", "subformat=monolithicSparse,compat6=on"),
    "small-sparse": qemu("small", "subformat=monolithicSparse"),
    "small-stream": qemu("small", "subformat=streamOptimized"),
    "zeroed-grains": write_zeroed_grains,
    "crafted-sparse-g8": crafted("sparse-small", grain_sectors=8),
    "crafted-sparse-g16": crafted("sparse", grain_sectors=16),
    "crafted-sparse-g2048": crafted("small", grain_sectors=2048),
    "crafted-stream": crafted("guest", stream=True),
    "crafted-stream-g8": crafted("sparse-small", grain_sectors=8, stream=True),
    "crafted-stream-padded": crafted("sparse-small", stream=True, pad_final=True),
    "crafted-sparse-empty": crafted("empty", grain_sectors=8),
    "crafted-stream-empty": crafted("empty", stream=True),
}


class Images:
    """Each fixture image is built on first use and kept for the session."""

    def __init__(self, directory: Path, raws: dict[str, Path]) -> None:
        self.directory = directory
        self.raws = raws
        self.built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            out = self.directory / f"{name}.vmdk"
            BUILDERS[name](self.raws, out)
            self.built[name] = out
        return self.built[name]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, guest_raw: Path) -> Images:
    directory = tmp_path_factory.mktemp("vmdk")
    raws = {
        name: directory / f"{name}.raw" for name in ("small", "sparse", "sparse-small", "empty")
    }
    raws["guest"] = guest_raw
    write_guest(raws["small"], 3 * MiB + 3 * SECTOR, seed=5)
    write_sparse_guest(raws["sparse"], 70 * MiB + 3 * SECTOR, seed=6)
    write_sparse_guest(raws["sparse-small"], 9 * MiB + 3 * SECTOR, seed=7)
    with open(raws["empty"], "wb") as f:
        f.truncate(5 * MiB)
    return Images(directory, raws)


# -- byte-exact against qemu-img ----------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_matches_qemu(images: Images, tmp_path: Path, name: str) -> None:
    path = images[name]
    with LocalFile(path) as src:
        assert detect_format(src) == "vmdk"
    assert rehost_sha256(path, tmp_path) == oracle_sha256(path, tmp_path, "vmdk")
    with open_image(LocalFile(path)) as img:
        expected = "streamOptimized" if "stream" in name else "monolithicSparse"
        assert img.subformat == expected == img.details["create_type"]
        assert img.compression == ("zlib" if "stream" in name else None)
        assert img.details["parent_cid"] == "ffffffff"
        report = img.check()
        assert report.data_bytes + report.compressed_bytes + report.zero_bytes == img.virtual_size


def test_details(images: Images) -> None:
    with open_image(LocalFile(images["sparse"])) as img:
        d = img.details
        assert (d["version"], d["grain_size"], d["num_gtes_per_gt"]) == (1, 65536, 512)
        assert d["gd_offset"] == 26 * SECTOR and d["rgd_offset"] == 21 * SECTOR
        assert d["compress_algorithm"] == "none" and not d["footer"]
        assert img.cluster_size == 65536 and any("descriptor" in c for c in img.checks)
    with open_image(LocalFile(images["crafted-stream"])) as img:
        d = img.details
        assert (d["version"], d["footer"], d["rgd_offset"]) == (3, True, None)
        assert d["compress_algorithm"] == "deflate (zlib)" and d["cid"] == "1234abcd"


def test_unallocated_grain_tables_are_single_zero_extents(images: Images) -> None:
    with open_image(LocalFile(images["crafted-sparse-g16"])) as img:  # GT coverage 4 MiB
        extents = list(img.extents())
    zeros = [e for e in extents if e.kind is ExtentKind.ZERO]
    assert max(e.length for e in zeros) > 30 * MiB
    assert len(extents) < 12  # host-contiguous grains merged, empty ranges merged


def test_stream_grains_are_compressed_extents(images: Images) -> None:
    with open_image(LocalFile(images["stream-multi-gt"])) as img:
        grains = [e for e in img.extents() if e.kind is ExtentKind.COMPRESSED]
    assert grains and all(e.codec == "zlib" and e.length <= 65536 for e in grains)
    assert grains[-1].end == img.virtual_size and grains[-1].length == 3 * SECTOR


def test_zeroed_grains_are_zero_extents(images: Images) -> None:
    with open_image(LocalFile(images["zeroed-grains"])) as img:
        assert img.details["version"] == 2 and "zeroed grains" in img.details["flag_names"]
        kinds = [(e.offset, e.length, e.kind) for e in img.extents()]
    assert (512 * 1024, 256 * 1024, ExtentKind.ZERO) in kinds


def test_huge_sparse_disk_enumerates_by_tables(tmp_path: Path) -> None:
    path = tmp_path / "big.vmdk"
    qemu_create(path, "1T")
    began = time.monotonic()
    with open_image(LocalFile(path)) as img:
        assert list(img.extents()) == [Extent(0, 1 << 40, ExtentKind.ZERO)]
    assert time.monotonic() - began < 10


# -- hostile and unsupported input ------------------------------------------------

Mutation = Callable[[bytearray], bytes]


def refusal(path: Path, fmt: str | None = None) -> ImageMetadataError:
    """Open and fully check an image, expecting a refusal."""
    with (
        pytest.raises(ImageMetadataError) as info,
        LocalFile(path) as src,
        open_image(src, fmt) as img,
    ):
        img.check()
    return info.value


def field_at(b: bytes | bytearray, name: str, base: int = 0) -> int:
    off, code = FIELDS[name]
    value: int = struct.unpack_from("<" + code, b, base + off)[0]
    return value


def set_field(name: str, value: int | bytes, footer: bool = False) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        off, code = FIELDS[name]
        struct.pack_into("<" + code, b, (len(b) - 2 * SECTOR if footer else 0) + off, value)
        return bytes(b)

    return mutate


def set_flag(bit: int) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        return set_field("flags", field_at(b, "flags") | bit)(b)

    return mutate


def chain(*mutations: Mutation) -> Mutation:
    """Apply in-place mutations one after another."""

    def mutate(b: bytearray) -> bytes:
        for m in mutations:
            m(b)
        return bytes(b)

    return mutate


def truncate(keep: Callable[[int], int]) -> Mutation:
    return lambda b: bytes(b[: keep(len(b))])


def gd_location(b: bytes | bytearray) -> int:
    gd = field_at(b, "gd")
    return field_at(b, "gd", len(b) - 2 * SECTOR) if gd == GD_AT_END else gd


def set_gd_entry(index: int, value: Callable[[bytearray], int]) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        struct.pack_into("<I", b, gd_location(b) * SECTOR + 4 * index, value(b))
        return bytes(b)

    return mutate


def gte_offset(b: bytes | bytearray, k: int) -> int:
    """File offset of entry k of the first grain table."""
    gt: int = struct.unpack_from("<I", b, gd_location(b) * SECTOR)[0]
    return gt * SECTOR + 4 * k


def set_gte(k: int, value: int) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        struct.pack_into("<I", b, gte_offset(b, k), value)
        return bytes(b)

    return mutate


def share_grains(b: bytearray) -> bytes:
    """Point every entry of every grain table at the first grain: a small file that
    describes its whole disk as data (with a 2 GiB disk, 384 KiB wrote 2 GiB)."""
    grain = first_grain(b) // SECTOR
    gd = gd_location(b) * SECTOR
    for i in range(-(-field_at(b, "capacity") // (512 * field_at(b, "grain")))):
        gt = struct.unpack_from("<I", b, gd + 4 * i)[0]
        struct.pack_into("<512I", b, gt * SECTOR, *[grain] * 512)
    return bytes(b)


def first_grain(b: bytes | bytearray) -> int:
    """File offset of the first allocated grain (its marker, in a stream)."""
    entries: tuple[int, ...] = struct.unpack_from("<512I", b, gte_offset(b, 0))
    return next(e for e in entries if e) * SECTOR


def edit_grain_marker(lba: int | None = None, size: int | None = None) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        at = first_grain(b)
        old_lba, old_size = struct.unpack_from("<QI", b, at)
        struct.pack_into(
            "<QI", b, at, old_lba if lba is None else lba, old_size if size is None else size
        )
        return bytes(b)

    return mutate


def garble_grain(b: bytearray) -> bytes:
    at = first_grain(b) + 12
    size = struct.unpack_from("<I", b, at - 8)[0]
    b[at + size // 2 : at + size // 2 + 8] = b"\xff" * 8
    return bytes(b)


def cut_grain(n: int) -> Mutation:
    """Shorten the first grain's stream by n bytes, of its 4-byte Adler-32 trailer."""

    def mutate(b: bytearray) -> bytes:
        at = first_grain(b)
        struct.pack_into("<I", b, at + 8, struct.unpack_from("<I", b, at + 8)[0] - n)
        return bytes(b)

    return mutate


def short_grain(b: bytearray) -> bytes:
    """Replace the first grain's stream with one that decodes to half a grain."""
    at = first_grain(b)
    stream = zlib.compress(bytes(32768))
    struct.pack_into("<I", b, at + 8, len(stream))
    b[at + 12 : at + 12 + len(stream)] = stream
    return bytes(b)


def edit_descriptor(change: Callable[[str], str]) -> Mutation:
    def mutate(b: bytearray) -> bytes:
        region = slice(SECTOR, 21 * SECTOR)
        text = bytes(b[region]).split(b"\0", 1)[0].decode()
        new = change(text).encode()
        assert len(new) < 20 * SECTOR
        b[region] = new.ljust(20 * SECTOR, b"\0")
        return bytes(b)

    return mutate


def sub(pattern: str, replacement: str) -> Mutation:
    def change(text: str) -> str:
        new, n = re.subn(pattern, replacement, text)
        assert n, pattern
        return new

    return edit_descriptor(change)


def case(
    name: str, base: str, mutate: Mutation, reason: str, hint: str | None = None
) -> ParameterSet:
    """A corrupt image: a mutation of a fixture, and the refusal reason (and hint) expected."""
    return pytest.param(base, mutate, reason, hint, id=name)


EXTENT = r'RW (\d+) SPARSE "[^"]*"'
CASES = [
    case("version-4", "small-sparse", set_field("version", 4), "unsupported VMDK version 4"),
    case("version-0", "small-sparse", set_field("version", 0), "unsupported VMDK version 0"),
    case("unknown-flag", "small-sparse", set_flag(1 << 5), "unknown header flags 0x20"),
    case("text-mode-transfer", "small-sparse", set_field("check_bytes", b"\n \n\n"), "text-mode"),
    case("compress-lzw", "small-sparse", set_field("compress", 2), "compressAlgorithm 2"),
    case("compress-no-flags", "small-sparse", set_field("compress", 1), "lack the compressed"),
    case("flags-no-compress", "small-sparse", set_flag(1 << 16), "compressAlgorithm is 0"),
    case("grain-not-pow2", "small-sparse", set_field("grain", 96), "grainSize 96"),
    case("grain-absurd", "small-sparse", set_field("grain", 1 << 22), "not a power of two"),
    case("grain-zero", "small-sparse", set_field("grain", 0), "grainSize 0"),
    case("gtes-256", "small-sparse", set_field("gtes", 256), "numGTEsPerGT is 256"),
    case("capacity-huge", "small-sparse", set_field("capacity", 1 << 40), "64 TiB"),
    case("capacity-zero", "small-sparse", set_field("capacity", 0), "not positive"),
    case(
        "capacity-64t-tiny-file",
        "small-sparse",
        chain(set_field("capacity", 1 << 37), sub(EXTENT, 'RW 137438953472 SPARSE "d.vmdk"')),
        "grain directory at offset",
    ),
    case(
        "gd-too-many-entries",
        "small-sparse",
        chain(set_field("grain", 1), set_field("capacity", 1 << 35)),
        "qemu refuses more than",
    ),
    case("gd-past-eof", "small-sparse", set_field("gd", 1 << 40), "grain directory at offset"),
    case(
        "gd-on-header",
        "small-sparse",
        set_field("gd", 0),
        "header [0, 512) overlaps the grain directory",
    ),
    case("gd-on-descriptor", "small-sparse", set_field("gd", 3), "overlaps the grain directory"),
    case(
        "gd-on-rgd",
        "small-sparse",
        lambda b: set_field("gd", field_at(b, "rgd"))(b),
        "overlaps the redundant",
    ),
    case("gd-among-grains", "small-sparse", set_field("gd", 200), "past grainOffset"),
    case("rgd-zero", "small-sparse", set_field("rgd", 0), "rgdOffset is 0"),
    case(
        "rgd-past-eof",
        "small-sparse",
        set_field("rgd", 1 << 33),
        "redundant grain directory at offset",
    ),
    case(
        "grain-offset-past-eof", "small-sparse", set_field("grain_offset", 1 << 30), "grainOffset"
    ),
    case("grain-offset-in-descriptor", "small-sparse", set_field("grain_offset", 5), "grainOffset"),
    case("descriptor-moved", "small-sparse", set_field("desc_offset", 5), "at sector 5"),
    case(
        "descriptor-absent",
        "small-sparse",
        set_field("desc_size", 0),
        "no embedded descriptor",
        SINGLE_FILE_HINT,
    ),
    case("descriptor-huge", "small-sparse", set_field("desc_size", 1 << 40), "implausible"),
    case(
        "descriptor-unterminated",
        "small-sparse",
        lambda b: bytes(b[:SECTOR] + b"#" * 20 * SECTOR + b[21 * SECTOR :]),
        "NUL",
    ),
    case(
        "gd-entry-past-eof", "small-sparse", set_gd_entry(0, lambda b: 0x7FFFFFFF), "beyond the end"
    ),
    case(
        "gd-entry-on-rgd",
        "small-sparse",
        set_gd_entry(0, lambda b: field_at(b, "rgd")),
        "overlaps the redundant grain directory",
    ),
    case(
        "gd-entry-on-gd",
        "small-sparse",
        set_gd_entry(0, lambda b: field_at(b, "gd")),
        "overlaps the grain directory",
    ),
    case(
        "gd-entry-among-grains",
        "small-sparse",
        set_gd_entry(0, lambda b: field_at(b, "grain_offset") + 8),
        "past grainOffset",
    ),
    case(
        "gt-out-of-order",
        "crafted-sparse-g8",
        set_gd_entry(2, lambda b: struct.unpack_from("<I", b, 21 * SECTOR)[0]),
        "out of order",
    ),
    case(
        "gt-overlapping",
        "crafted-sparse-g8",
        set_gd_entry(2, lambda b: struct.unpack_from("<I", b, 21 * SECTOR)[0] + 2),
        "overlaps the previous",
    ),
    case("gte-past-eof", "small-sparse", set_gte(0, 0x7FFFFFFF), "beyond the end"),
    case("gte-in-descriptor", "small-sparse", set_gte(0, 2), "inside the metadata"),
    case(
        "gte-on-gt",
        "small-sparse",
        lambda b: set_gte(0, field_at(b, "gd") + 1)(b),
        "inside the metadata",
    ),
    case("gte-zeroed-without-flag", "small-sparse", set_gte(3, 1), "inside the metadata"),
    case("grains-shared", "sparse", share_grains, "must be sharing grains"),
    case("truncated-in-half", "small-sparse", truncate(lambda n: n // 2), "beyond the end"),
    case(
        "truncated-in-tables",
        "small-sparse",
        truncate(lambda n: 13 * SECTOR + 100),
        "beyond the end",
    ),
    case(
        "truncated-in-descriptor",
        "small-sparse",
        truncate(lambda n: 3000),
        "embedded descriptor at offset 512",
    ),
    case("truncated-in-header", "small-sparse", truncate(lambda n: 100), "truncated"),
    case("stream-truncated-in-half", "small-stream", truncate(lambda n: n // 2), "beyond the end"),
    case(
        "stream-marker-lba", "small-stream", edit_grain_marker(lba=999), "is for guest sector 999"
    ),
    case("stream-marker-size-zero", "small-stream", edit_grain_marker(size=0), "stream of 0 bytes"),
    case(
        "stream-marker-size-huge",
        "small-stream",
        edit_grain_marker(size=1 << 31),
        "stream of 2147483648 bytes",
    ),
    case("stream-marker-in-metadata", "small-stream", set_gte(0, 2), "inside the metadata"),
    case("stream-garbled", "small-stream", garble_grain, "garbled"),
    case("stream-adler-cut-1", "small-stream", cut_grain(1), "ends before its Adler-32"),
    case("stream-adler-cut-4", "small-stream", cut_grain(4), "ends before its Adler-32"),
    case("stream-short-grain", "small-stream", short_grain, "decodes to 32768 bytes, not 65536"),
    case(
        "stream-createtype-mismatch",
        "small-stream",
        sub("streamOptimized", "monolithicSparse"),
        "createType is monolithicSparse",
    ),
    case("footer-missing", "crafted-stream-g8", truncate(lambda n: n - SECTOR), "footer marker"),
    case(
        "footer-truncated-in-half",
        "crafted-stream-g8",
        truncate(lambda n: n // 2 // SECTOR * SECTOR),
        "footer",
    ),
    case(
        "footer-odd-size",
        "crafted-stream-g8",
        truncate(lambda n: n - 7),
        "cannot end in a 1536-byte footer",
    ),
    case(
        "footer-eos-corrupt",
        "crafted-stream-g8",
        lambda b: bytes(b[:-SECTOR] + struct.pack("<QII", 0, 0, 7).ljust(SECTOR, b"\0")),
        "end-of-stream",
    ),
    case(
        "footer-capacity",
        "crafted-stream-g8",
        set_field("capacity", 4096, footer=True),
        "disagree on capacity",
    ),
    case(
        "footer-gd-at-end",
        "crafted-stream-g8",
        set_field("gd", GD_AT_END, footer=True),
        "GD_AT_END too",
    ),
    case(
        "footer-gd-past-eof",
        "crafted-stream-g8",
        set_field("gd", 1 << 35, footer=True),
        "grain directory at offset",
    ),
    case(
        "footer-gd-on-footer",
        "crafted-stream-g8",
        lambda b: set_field("gd", len(b) // SECTOR - 2, footer=True)(b),
        "overlaps the footer",
    ),
    case(
        "footer-uncompressed",
        "crafted-stream-g8",
        chain(set_field("compress", 0), set_field("compress", 0, footer=True)),
        "announce compressed",
    ),
    case(
        "footer-stream-gt-past-eof",
        "crafted-stream-g8",
        set_gd_entry(0, lambda b: 0x7FFFFFF0),
        "beyond the end",
    ),
    case(
        "footer-stream-grain-on-gd",
        "crafted-stream-g8",
        lambda b: set_gte(0, gd_location(b))(b),
        "overlaps the grain directory",
    ),
    # The embedded descriptor.
    case(
        "extent-absolute-path",
        "small-sparse",
        sub(EXTENT, r'RW \1 SPARSE "/etc/passwd"'),
        "names another file by path",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-relative-path",
        "small-sparse",
        sub(EXTENT, r'RW \1 SPARSE "../other.vmdk"'),
        "names another file by path",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-windows-path",
        "small-sparse",
        sub(EXTENT, r'RW \1 SPARSE "C:\\\\disks\\\\d.vmdk"'),
        "names another file by path",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-second-line",
        "small-sparse",
        sub(f"({EXTENT})", r'\1\nRW 2048 FLAT "other-flat.vmdk" 0'),
        "names 2 extents",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-flat",
        "small-sparse",
        sub(EXTENT, r'RW \1 FLAT "d-flat.vmdk" 0'),
        "not a readable SPARSE extent",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-noaccess",
        "small-sparse",
        sub(EXTENT, r'NOACCESS \1 SPARSE "d.vmdk"'),
        "not a readable SPARSE extent",
        SINGLE_FILE_HINT,
    ),
    case(
        "extent-size-mismatch",
        "small-sparse",
        sub(EXTENT, 'RW 2048 SPARSE "d.vmdk"'),
        "says 2048 sectors",
    ),
    case("extent-none", "small-sparse", sub(EXTENT, ""), "names 0 extents"),
    case(
        "extent-malformed",
        "small-sparse",
        sub(EXTENT, 'RW many SPARSE "d.vmdk"'),
        "malformed extent line",
    ),
    case(
        "parent-file-name-hint",
        "small-sparse",
        sub("createType", 'parentFileNameHint="base.vmdk"\ncreateType'),
        "parentFileNameHint",
        SINGLE_FILE_HINT,
    ),
    case(
        "parent-hint-in-comment",
        "small-sparse",
        sub("# Extent description", "# parentFileNameHint"),
        "parentFileNameHint",
        SINGLE_FILE_HINT,
    ),
    case(
        "parent-cid",
        "small-sparse",
        sub("parentCID=ffffffff", "parentCID=0badcafe"),
        "parentCID is 0badcafe",
        SINGLE_FILE_HINT,
    ),
    case(
        "parent-cid-missing", "small-sparse", sub("parentCID=ffffffff", ""), "parentCID is missing"
    ),
    case("cid-not-hex", "small-sparse", sub("CID=[0-9a-f]+\n", "CID=xyz\n"), "CID is 'xyz'"),
    case(
        "createtype-flat",
        "small-sparse",
        sub('createType="monolithicSparse"', 'createType="monolithicFlat"'),
        "keeps the disk's data in other files",
        SINGLE_FILE_HINT,
    ),
    case(
        "createtype-vmfs",
        "small-sparse",
        sub('createType="monolithicSparse"', 'createType="vmfsSparse"'),
        "keeps the disk's data in other files",
        SINGLE_FILE_HINT,
    ),
    case(
        "createtype-unknown",
        "small-sparse",
        sub('createType="monolithicSparse"', 'createType="bogus"'),
        "unsupported createType 'bogus'",
    ),
    case(
        "createtype-stream",
        "small-sparse",
        sub("monolithicSparse", "streamOptimized"),
        "createType is streamOptimized",
    ),
    case(
        "createtype-missing",
        "small-sparse",
        sub('createType="monolithicSparse"', ""),
        "no createType",
    ),
    case(
        "createtype-twice",
        "small-sparse",
        sub('(createType="monolithicSparse")', r"\1\n\1"),
        "createType more than once",
    ),
]


@pytest.mark.parametrize(("base", "mutate", "reason", "hint"), CASES)
def test_refused(
    images: Images, tmp_path: Path, base: str, mutate: Mutation, reason: str, hint: str | None
) -> None:
    path = tmp_path / "bad.vmdk"
    path.write_bytes(mutate(bytearray(images[base].read_bytes())))
    began = time.monotonic()
    err = refusal(path, "vmdk")
    assert reason in err.reason
    if hint is not None:
        assert err.hint == hint
    assert time.monotonic() - began < 5


def test_refused_before_writing(images: Images, tmp_path: Path) -> None:
    path = tmp_path / "bad.vmdk"
    path.write_bytes(edit_grain_marker(lba=7)(bytearray(images["small-stream"].read_bytes())))
    with pytest.raises(ImageMetadataError, match="is for guest sector 7"):
        rehost_sha256(path, tmp_path)
    out = (tmp_path / "bad.vmdk.rehost.raw").read_bytes()
    assert out.count(0) == len(out)  # the metadata survey failed before any write


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.vmdk"
    path.write_bytes(b"KDMW" + bytes(4096))
    assert "bad magic b'KDMW'" in refusal(path, "vmdk").reason


def test_cowd_refused(tmp_path: Path) -> None:
    path = tmp_path / "esx.vmdk"
    path.write_bytes(b"COWD" + struct.pack("<II", 1, 3) + bytes(4096))
    err = refusal(path)
    assert "COWD" in err.reason and err.hint == SINGLE_FILE_HINT


def test_delta_disk_refused(images: Images, tmp_path: Path) -> None:
    child = tmp_path / "child.vmdk"
    qemu_create(child, "", "", "-b", images["small-sparse"], "-F", "vmdk")
    err = refusal(child)
    assert "parentFileNameHint" in err.reason and err.hint == SINGLE_FILE_HINT


@pytest.mark.parametrize(
    ("subformat", "extent_file"),
    [
        ("monolithicFlat", "d-flat.vmdk"),
        ("twoGbMaxExtentSparse", "d-s001.vmdk"),
        ("twoGbMaxExtentFlat", "d-f001.vmdk"),
    ],
)
def test_descriptor_file_refused(tmp_path: Path, subformat: str, extent_file: str) -> None:
    qemu_create(tmp_path / "d.vmdk", "1M", f"subformat={subformat}")
    err = refusal(tmp_path / "d.vmdk")
    assert "descriptor file" in err.reason and subformat in err.reason
    assert extent_file in err.reason and err.hint == SINGLE_FILE_HINT


def test_sparse_extent_of_split_disk_refused(tmp_path: Path) -> None:
    """The -s001 file of a twoGbMaxExtentSparse disk is a sparse extent with no descriptor."""
    qemu_create(tmp_path / "d.vmdk", "1M", "subformat=twoGbMaxExtentSparse")
    err = refusal(tmp_path / "d-s001.vmdk")
    assert "no embedded descriptor" in err.reason and err.hint == SINGLE_FILE_HINT


def test_descriptor_without_banner_detected_and_refused(tmp_path: Path) -> None:
    """qemu's probe takes comments then `version=1` as a descriptor; so does ours."""
    path = tmp_path / "d.vmdk"
    path.write_bytes(
        b'# made by hand\nversion=1\ncreateType="vmfs"\n'
        b'RW 2048 VMFS "/vmfs/volumes/x/d-flat.vmdk"\n'
    )
    err = refusal(path)
    assert "'/vmfs/volumes/x/d-flat.vmdk'" in err.reason and err.hint == SINGLE_FILE_HINT


def test_a_streams_grain_tables_are_fetched_ahead_over_a_remote_source(tmp_path: Path) -> None:
    """A true stream's grain tables each follow their grains: hinted ahead, in parallel."""
    raw, img_path = tmp_path / "sparse.raw", tmp_path / "stream.vmdk"
    write_scattered(raw)
    craft_vmdk(raw, img_path, grain_sectors=8, stream=True)  # a grain table per 2 MiB
    assert_tables_fetched_ahead(img_path)


def test_a_descriptor_number_too_long_for_int_is_refused(tmp_path: Path) -> None:
    """A sector count of thousands of digits (Python refuses to parse over 4300) is a
    malformed extent line, refused as metadata, not a crash (found by fuzzing)."""
    desc = tmp_path / "big.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                    f'RW {"9" * 5000} FLAT "big-flat.vmdk" 0\n')  # fmt: skip
    with pytest.raises(ImageMetadataError), LocalFile(desc) as src:
        open_image(src).close()
